"""One matrix's empirical spectral density, as a user asks for it: ``layerscope.esd(...)``.

The ESD is the eigenvalues of WᵀW on the smaller side (the squared singular values, raw units, ascending,
float64), computed as the scan computes them.  ``randomize=True`` shuffles the weight's entries first (a
seeded permutation: the randomized ESD of WeightWatcher, whose own shuffle is unseeded).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope.errors import LayerscopeError
from layerscope.spectral import esd as gram
from layerscope.spectral.rmt import shuffled_eigenvalues


def esd(source, name: str | None = None, *, randomize: bool = False, seed: int = 0) -> np.ndarray:
    """Eigenvalues of one matrix.  ``source``: a 2-D tensor or array; or a checkpoint path, a model in memory, a
    state dict or a scan table (its ``attrs['path']``) with ``name``, the matrix's name in the scan table
    (``encoder.layer.0.attention.self.query.weight``; an expert of a stacked tensor as ``name[j]``)."""
    weight = _matrix(source, name)
    if weight.dim() != 2 or min(weight.shape) < 1:
        raise LayerscopeError(f"{name or 'matrix'}: shape {tuple(weight.shape)}; an ESD needs a 2-D matrix")
    if not torch.isfinite(weight).all():
        raise LayerscopeError(f"{name or 'matrix'}: holds NaN or infinity; no spectrum")
    weight = weight.detach().to("cpu", torch.float64)
    if randomize:
        rng = np.random.default_rng([seed, zlib.crc32((name or "matrix").encode("utf-8", "surrogatepass"))])
        return np.sort(shuffled_eigenvalues(weight, rng))
    eigs, _ = gram.gram_eigenvalues(weight[None], torch.float64)
    return np.sort(eigs[0].numpy())


def _matrix(source, name: str | None) -> torch.Tensor:
    if isinstance(source, np.ndarray):
        return torch.from_numpy(source)
    if isinstance(source, torch.Tensor):
        return source
    if name is None:
        raise LayerscopeError("esd: give a matrix, or a model / checkpoint / scan table with the matrix's name")
    if isinstance(source, pd.DataFrame):
        path = source.attrs.get("path")
        if not path or str(path).startswith("<"):
            raise LayerscopeError("esd: this scan table was made from a model in memory; pass the model itself")
        source = path
    return named_matrix(source, name)


def named_matrix(source, name: str) -> torch.Tensor:
    """The matrix a scan row ``name`` analysed: a tensor of a checkpoint, model or state dict, or one expert
    (``name[j]``) of a stacked expert tensor."""
    from collections.abc import Mapping

    from layerscope.checkpoint import open_checkpoint
    from layerscope.checkpoint.memory import checkpoint_of_module, checkpoint_of_state_dict
    from layerscope.checkpoint.quantization import load_logical, logical_tensors

    tensor_name, expert = name, None
    if name.endswith("]") and "[" in name:
        tensor_name, index = name[:-1].rsplit("[", 1)
        expert = int(index)
    if isinstance(source, torch.nn.Module):
        checkpoint = checkpoint_of_module(source)
    elif isinstance(source, Mapping):
        checkpoint = checkpoint_of_state_dict(source)
    else:
        checkpoint = open_checkpoint(Path(source))
    logical = {t.name: t for t in logical_tensors(checkpoint)}
    if tensor_name not in logical:
        close = sorted(n for n in logical if tensor_name.split(".")[-2:] == n.split(".")[-2:])[:3]
        raise LayerscopeError(f"{name}: no such tensor in {checkpoint.path}" + (f" (similar: {', '.join(close)})"
                                                                              if close else ""))
    weight = load_logical(checkpoint, logical[tensor_name])
    if expert is not None:
        return weight.reshape(-1, *weight.shape[-2:])[expert]
    return weight
