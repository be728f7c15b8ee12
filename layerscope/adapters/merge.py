"""Merge a one-expert adapter into its base model: W' = W + s·B·A, written as safetensors shards.

The output folder has the base's layout: the same shard files (or single file), the same tensor
names, dtypes, shapes and order, the same ``model.safetensors.index.json`` and ``__metadata__``;
every non-weight file of the base folder (config, tokenizer...) is copied.  Tensors are read, merged
(in float64, then cast back to the stored dtype) and written one at a time, so memory holds one
tensor, not the model.  All files are written as one output set (complete, or nothing).

Adapters: a layerscope ``save_adapters`` folder of a plan with one expert per layer (LoRA or MoR),
or a PEFT LoRA folder (``adapter_config.json``; s from ``lora_alpha``/``r``, rslora and patterns as
in :mod:`layerscope.adapters.updates`).  Mixtures (several experts) have no single merged weight
and are refused, as are quantized base weights (a merged weight would need requantizing).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

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
from layerscope.checkpoint.reader import SAFETENSORS_DTYPE, TensorInfo, open_checkpoint, read_raw, read_tensor
from layerscope.errors import LayerscopeError
from layerscope.outputs import write_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def merge(base: str | Path, adapter: str | Path, out: str | Path, progress: bool = True) -> list[Path]:
    """Write the merged model to ``out``; return the files written."""
    from tqdm.auto import tqdm

    base, adapter, out = Path(base), Path(adapter), Path(out)
    updates = _single_expert_updates(adapter)
    ckpt = open_checkpoint(base)
    if any(info.container != "safetensors" for info in ckpt.tensors.values()):
        raise LayerscopeError(f"{base}: merge writes safetensors and reads safetensors bases only")
    quantized = {t.name for t in logical_tensors(ckpt) if t.quantization}
    targets: dict[str, Update] = {}
    for update in updates:
        name = base_tensor(ckpt, update.module)
        if name in quantized:
            raise LayerscopeError(f"{base}: {name} is quantized; merging into quantized weights is not exact")
        if name in targets:
            raise LayerscopeError(f"{adapter}: two adapted modules map to the base tensor {name}")
        targets[name] = update
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    writers = {}
    bar = tqdm(total=len(ckpt.tensors), desc="merge", unit="tensor", disable=(not progress) or None)
    for file in ckpt.files:
        infos = sorted((i for i in ckpt.tensors.values() if i.file == file), key=lambda i: i.begin)
        writers[out / file.name] = _shard_writer(file, infos, targets, bar)
    if ckpt.path.is_dir():
        for extra in sorted(folder.iterdir()):
            if extra.is_file() and not extra.name.endswith(WEIGHT_SUFFIXES) and not extra.name.startswith("."):
                writers[out / extra.name] = lambda tmp, source=extra: shutil.copyfile(source, tmp)
        for extra in module_files(folder):
            writers[out / extra.relative_to(folder)] = lambda tmp, source=extra: shutil.copyfile(source, tmp)
    written = write_files(writers)
    bar.close()
    return written


def module_files(folder: Path) -> list[Path]:
    """Every file of the sub-folders a sentence-transformers ``modules.json`` names (``1_Pooling/config.json``):
    without them ``SentenceTransformer(merged)`` cannot rebuild the pipeline."""
    index = folder / "modules.json"
    if not index.is_file():
        return []
    try:
        modules = json.loads(index.read_text(encoding="utf-8"))
        paths = [str(module.get("path") or "") for module in modules]
    except (ValueError, AttributeError, TypeError):
        raise LayerscopeError(f"{index}: not a sentence-transformers module list (a JSON list of objects with "
                              "'path')") from None
    files = []
    root = folder.resolve()
    for relative in paths:
        sub = (folder / relative).resolve()
        if not relative or not sub.is_dir() or root not in sub.parents:
            continue  # the root module, a module without files (Normalize), or a path outside the folder
        files.extend(sorted(f for f in sub.rglob("*") if f.is_file() and not f.name.startswith(".")))
    return [folder / f.relative_to(root) for f in files]


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


def _shard_writer(file: Path, infos: list[TensorInfo], targets: dict[str, Update], bar):
    """A writer for one output shard: the base shard's header (same entries and offsets), then each
    tensor's bytes in file order, merged where an update targets it."""
    metadata = _metadata(file)

    def write(tmp: Path) -> None:
        header: dict = {"__metadata__": metadata} if metadata is not None else {}
        start = infos[0].begin if infos else 0
        for info in infos:
            header[info.name] = {"dtype": info.dtype, "shape": list(info.shape),
                                 "data_offsets": [info.begin - start, info.end - start]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            for info in infos:
                update = targets.get(info.name)
                handle.write(bytes(read_raw(info)) if update is None else _merged_bytes(info, update))
                bar.update(1)

    return write


def _metadata(file: Path) -> dict | None:
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length)).get("__metadata__")


def _merged_bytes(info: TensorInfo, update: Update) -> bytes:
    weight = read_tensor(info)
    if not weight.is_floating_point() or weight.dim() != 2:
        raise LayerscopeError(f"{info.file}: {info.name} ({info.dtype}, {list(info.shape)}) is not a float matrix")
    delta = explicit_delta(update, tuple(weight.shape), f"{info.file}: {info.name}")
    merged = (weight.to(torch.float64) + delta).to(weight.dtype).contiguous()
    if SAFETENSORS_DTYPE.get(merged.dtype) != info.dtype:
        raise LayerscopeError(f"{info.file}: {info.name}: cannot write back dtype {info.dtype}")
    return merged.view(torch.uint8).numpy().tobytes() if merged.numel() else b""
