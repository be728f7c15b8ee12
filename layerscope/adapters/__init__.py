"""Adapters above the pipeline: their spectra (ΔW = s·B·A, and W + ΔW against a base), merging them into
the base, and ``scan`` for any folder — a checkpoint or an adapter.

This stage sits above spectral analysis and planning because an adapter folder of ours carries its
plan: reading one needs both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pandas as pd

from layerscope.adapters.merge import merge
from layerscope.adapters.spectra import scan_adapter
from layerscope.adapters.updates import adapter_kind
from layerscope.errors import LayerscopeError
from layerscope.spectral.scan import ScanOptions
from layerscope.spectral.scan import scan as scan_checkpoint_path

__all__ = ["merge", "scan", "scan_adapter"]


def scan(path, **options) -> pd.DataFrame:
    """Per-matrix spectral metrics of a checkpoint (folder, file, GGUF), an adapter folder's updates, a model
    in memory (``torch.nn.Module``: transformers, PEFT-wrapped, plain torch; see layerscope.adapters.memory), or a
    state dict (a mapping of names to tensors or arrays, as WeightWatcher takes one).

    Keyword options are the fields of :class:`layerscope.spectral.ScanOptions`; ``base`` (adapters
    only) also analyses W + ΔW of that base model.  Model facts are in ``df.attrs``.
    """
    opts = ScanOptions(**options)
    opts.validate()  # option errors before any file is opened
    if isinstance(path, Mapping):  # a state dict, as WeightWatcher takes one
        from layerscope.checkpoint.memory import checkpoint_of_state_dict
        from layerscope.spectral.scan import scan_checkpoint

        if opts.base is not None:
            raise LayerscopeError("base= applies to adapter folders, not to a state dict")
        return scan_checkpoint(checkpoint_of_state_dict(path), replace(opts, live_names=False))
    if not isinstance(path, (str, Path)):
        import torch

        if isinstance(path, torch.nn.Module):
            from layerscope.adapters.memory import scan_module

            if opts.base is not None:
                raise LayerscopeError("base= applies to adapter folders; a PEFT model in memory carries its base")
            return scan_module(path, opts)
        raise LayerscopeError(f"scan: expected a path or a torch.nn.Module, got {type(path).__name__}")
    if adapter_kind(Path(path)) is not None:
        return scan_adapter(path, base=opts.base, estimators=opts.estimators, progress=opts.progress)
    if opts.base is not None:
        raise LayerscopeError(f"--base applies to adapter folders; {path} is not one")
    return scan_checkpoint_path(path, **{k: v for k, v in options.items() if k != "base"})
