"""A model already in memory (``torch.nn.Module``) as a checkpoint: its parameters are the tensors.

Tensor names are the ones ``save_pretrained`` writes: a transformers model that fused weights on load (the
experts of Qwen3-MoE or Mixtral become one 3-D ``experts.gate_up_proj``) is seen in its stored layout, each
expert's ``gate_proj`` / ``up_proj`` / ``down_proj`` apart, by transformers' own reverse conversion, one fused
parameter at a time and only when read.  The config is the model's ``config`` (none for a plain torch module).
The module tree is the model itself (nothing is built on the meta device), except for the model types the
naming tables verify: those are named by the tables, as their saved folders are.  So a model in memory gives
the rows of its saved folder, with the same names in the same order.  A parameter shared by two modules (a
tied LM head) is one tensor under its first name, as ``save_pretrained`` stores it once.  Quantized modules go
through the same recognition as stored checkpoints: bitsandbytes int8 layers (their state dict holds the
int8 ``weight`` and ``SCB``) are dequantized exactly; any other integer or packed weight is refused by name.

A state dict (a mapping of names to tensors or NumPy arrays, as WeightWatcher takes it; one nested under a
``state_dict`` key is unwrapped) is a checkpoint too: its names, an optional config, and no module tree, so
layers and roles come from the names alone, as for a file without its model class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from layerscope.checkpoint.modeltree import ModelTree, live_renamer, table_verified, tree_of_model
from layerscope.checkpoint.reader import SAFETENSORS_DTYPE, Checkpoint, TensorInfo, natural_key
from layerscope.errors import LayerscopeError

MEMORY_FILE = Path("<memory>")


def checkpoint_of_module(model: torch.nn.Module, label: str | None = None,
                         rename: Callable[[str], str | None] | None = None) -> Checkpoint:
    """The checkpoint view of ``model`` (see the module docstring).  ``rename`` maps a state-dict name to the
    name to scan it under, or None to leave it out (a PEFT model's base weights: see layerscope.adapters)."""
    if not isinstance(model, torch.nn.Module):
        raise LayerscopeError(f"expected a path or a torch.nn.Module, got {type(model).__name__}")
    tensors: dict[str, TensorInfo] = {}
    seen: dict[tuple, str] = {}
    fused_into: dict[str, str] = {}
    stored_layout = _stored_layout(model) if rename is None else None
    for stored, tensor in _named_weights(model):
        name = rename(stored) if rename is not None else stored
        if name is None:
            continue
        if tensor.device.type == "meta":
            raise LayerscopeError(f"{name}: on the meta device (no values); load the weights first")
        key = _storage_key(name, tensor)
        if key in seen:  # tied: stored once
            continue
        seen[key] = name
        dtype = SAFETENSORS_DTYPE.get(tensor.dtype)
        if dtype is None:
            raise LayerscopeError(f"{name}: dtype {tensor.dtype} is not one layerscope reads")
        parts = stored_layout(name, tensor) if stored_layout is not None else None
        if parts is None:
            tensors[name] = TensorInfo(name=name, file=MEMORY_FILE, dtype=dtype, shape=tuple(tensor.shape), begin=0,
                                       end=0, container="memory", value=tensor)
            continue
        for part, (shape, load) in parts.items():
            tensors[part] = TensorInfo(name=part, file=MEMORY_FILE, dtype=dtype, shape=shape, begin=0, end=0,
                                       container="memory", value=load)
            if len(parts) > 1:
                fused_into[part] = name
    config = _config_of(model)
    checkpoint = Checkpoint(path=Path(label or f"<{type(model).__name__} in memory>"), files=[],
                            tensors=_in_file_order(tensors), config=config, fused_into=fused_into)
    if stored_layout is not None and table_verified(config):
        checkpoint.tree = None  # named by the naming tables, as its saved folder is (rows, names and order alike)
    else:
        checkpoint.tree = tree_of_model(model, live_renamer(model) if stored_layout is not None else None)
    if rename is not None:  # the tree speaks the scanned names too: wrapped Linears under their own names
        checkpoint.tree = renamed_tree(checkpoint.tree, rename)
    return checkpoint


def checkpoint_of_state_dict(state: Mapping, label: str | None = None, config: dict | None = None) -> Checkpoint:
    """The checkpoint view of a state dict (see the module docstring)."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    tensors: dict[str, TensorInfo] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise LayerscopeError(f"state dict key {name!r}: expected a tensor name (str)")
        tensor = _as_tensor(name, value)
        if tensor is None:
            continue
        dtype = SAFETENSORS_DTYPE.get(tensor.dtype)
        if dtype is None:
            raise LayerscopeError(f"{name}: dtype {tensor.dtype} is not one layerscope reads")
        tensors[name] = TensorInfo(name=name, file=MEMORY_FILE, dtype=dtype, shape=tuple(tensor.shape), begin=0,
                                   end=0, container="memory", value=tensor)
    if not tensors:
        raise LayerscopeError("the state dict holds no tensor")
    return Checkpoint(path=Path(label or "<state dict in memory>"), files=[], tensors=_in_file_order(tensors),
                      config=dict(config or {}))


def _in_file_order(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Tensors in the order a checkpoint's are read (natural name order), so a model in memory gives the rows of
    its saved folder in the same order (and a report picks the same matrices)."""
    return {name: tensors[name] for name in sorted(tensors, key=natural_key)}


def _as_tensor(name: str, value) -> torch.Tensor | None:
    """A tensor (NumPy arrays become tensors; optimizer steps and other scalars that are not tensors are skipped)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise LayerscopeError(f"{name}: on the meta device (no values); load the weights first")
        return value.detach()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return None
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else None


def renamed_tree(tree: ModelTree, rename: Callable[[str], str | None]) -> ModelTree:
    """``tree`` with every module path renamed as its weight is (modules whose weight is left out dropped)."""
    def module_name(path: str) -> str | None:
        renamed = rename(f"{path}.weight")
        return renamed.removesuffix(".weight") if renamed is not None else None

    linears = {module_name(p): shape for p, shape in tree.linears.items() if module_name(p) is not None}
    modules = frozenset(filter(None, (module_name(p) for p in tree.modules)))
    conv1d = frozenset(filter(None, (module_name(p) for p in tree.conv1d)))
    return replace(tree, linears=linears, modules=modules | frozenset(s.path for s in tree.stacks), conv1d=conv1d)


StoredLayout = Callable[[str, torch.Tensor], "dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] | None"]


def _stored_layout(model: torch.nn.Module) -> StoredLayout | None:
    """live parameter → {stored name: (shape, loader)} where transformers converted it on load (None where it
    did not), or None for a model transformers does not convert.  Shapes come from reverting a meta-device
    stand-in; the values are reverted when first read, and the last few conversions are kept, so a layer's
    experts are split once and a large model is never held twice."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    if not hasattr(model, "config") or not hasattr(model, "base_model_prefix"):
        return None
    recent: dict[str, dict[str, torch.Tensor]] = {}

    def reverted(live: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if live not in recent:
            while len(recent) >= 4:
                recent.pop(next(iter(recent)))
            recent[live] = {k: v.detach() for k, v in revert_weight_conversion(model, {live: tensor}).items()}
        return recent[live]

    def layout(live: str, tensor: torch.Tensor):
        try:
            stand_in = revert_weight_conversion(model, {live: torch.empty(tensor.shape, dtype=tensor.dtype,
                                                                          device="meta")})
        except Exception:  # noqa: BLE001 - a parameter transformers cannot revert is seen under its live name
            return None
        if list(stand_in) == [live]:
            return None
        return {name: (tuple(value.shape), _loader(reverted, live, tensor, name))
                for name, value in stand_in.items()}

    return layout


def _loader(reverted, live: str, tensor: torch.Tensor, name: str) -> Callable[[], torch.Tensor]:
    return lambda: reverted(live, tensor)[name]


def _storage_key(name: str, tensor: torch.Tensor) -> tuple:
    """Tensors with one key are one weight (tied parameters share storage; each ``detach()`` is a new object)."""
    if tensor.numel() == 0:
        return (name,)
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)


def _named_weights(model: torch.nn.Module):
    """Parameters and buffers under their state-dict names (bitsandbytes int8 layers put SCB there too)."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        yield name, tensor.detach()


def _config_of(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    document = config.to_dict()
    document.setdefault("architectures", [type(model).__name__])
    return document
