"""Merge a one-expert adapter into its base model: W' = W + s·B·A, written as safetensors shards.

The output folder has the base's layout (layerscope.adapters.rewrite): tensors are read, merged (in float64,
then cast back to the stored dtype) and written one at a time, so memory holds one tensor, not the model.

Adapters: a layerscope ``save_adapters`` folder of a plan with one expert per layer (LoRA or MoR),
or a PEFT LoRA folder (``adapter_config.json``; s from ``lora_alpha``/``r``, rslora and patterns as
in :mod:`layerscope.adapters.updates`).  Mixtures (several experts) have no single merged weight
and are refused, as are quantized base weights (a merged weight would need requantizing).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from layerscope.adapters.rewrite import require_safetensors, write_like
from layerscope.adapters.updates import (
    OURS,
    Update,
    adapter_kind,
    base_tensor,
    explicit_delta,
    layerscope_updates,
    peft_updates,
)
from layerscope.checkpoint.quantization import logical_tensors
from layerscope.checkpoint.reader import TensorInfo, open_checkpoint, read_tensor
from layerscope.errors import LayerscopeError


def merge(base: str | Path, adapter: str | Path, out: str | Path, progress: bool = True) -> list[Path]:
    """Write the merged model to ``out``; return the files written."""
    base, adapter, out = Path(base), Path(adapter), Path(out)
    updates = _single_expert_updates(adapter)
    ckpt = open_checkpoint(base)
    require_safetensors(ckpt, "merge")
    quantized = {t.name for t in logical_tensors(ckpt) if t.quantization}
    targets: dict[str, Update] = {}
    for update in updates:
        name = base_tensor(ckpt, update.module)
        if name in quantized:
            raise LayerscopeError(f"{base}: {name} is quantized; merging into quantized weights is not exact")
        if name in targets:
            raise LayerscopeError(f"{adapter}: two adapted modules map to the base tensor {name}")
        targets[name] = update
    return write_like(ckpt, out, {name: partial(_merged, update=update) for name, update in targets.items()},
                      "merge", progress)


def _single_expert_updates(adapter: Path) -> list[Update]:
    kind = adapter_kind(adapter)
    if kind is None:
        raise LayerscopeError(f"{adapter}: not an adapter folder (adapter_config.json or {OURS})")
    updates = peft_updates(adapter) if kind == "peft" else layerscope_updates(adapter)
    several = sorted({u.module for u in updates if u.expert not in (None, 0)})
    if several:
        raise LayerscopeError(f"{adapter}: module {several[0]!r} has several experts; only one-expert plans merge "
                              "into a single weight")
    return updates


def _merged(info: TensorInfo, update: Update) -> torch.Tensor:
    weight = read_tensor(info)
    if not weight.is_floating_point() or weight.dim() != 2:
        raise LayerscopeError(f"{info.file}: {info.name} ({info.dtype}, {list(info.shape)}) is not a float matrix")
    delta = explicit_delta(update, tuple(weight.shape), f"{info.file}: {info.name}")
    return weight.to(torch.float64) + delta
