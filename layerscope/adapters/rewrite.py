"""Write a checkpoint in its own layout with some tensors replaced: what ``merge`` and ``smooth`` produce.

The output folder has the source's layout: the same shard files (or single file), the same tensor names, dtypes,
shapes and order, the same ``model.safetensors.index.json`` and ``__metadata__``; every non-weight file of the
source folder (config, tokenizer …, and the sub-folders a sentence-transformers ``modules.json`` names) is copied.
Tensors are read, replaced and written one at a time, so memory holds one tensor, not the model.  All files are
written as one output set (complete, or nothing).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from layerscope.checkpoint.reader import SAFETENSORS_DTYPE, Checkpoint, TensorInfo, read_raw
from layerscope.errors import LayerscopeError
from layerscope.outputs import write_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

Replacement = Callable[[TensorInfo], torch.Tensor]  # the new weight (any float dtype: cast back to the stored one)


def require_safetensors(ckpt: Checkpoint, command: str) -> None:
    if not ckpt.files or any(info.container != "safetensors" for info in ckpt.tensors.values()):
        raise LayerscopeError(f"{ckpt.path}: {command} writes safetensors and reads safetensors checkpoints only")


def write_like(ckpt: Checkpoint, out: Path, replacements: dict[str, Replacement], desc: str,
               progress: bool = True, extra: dict[str, Callable[[], bytes]] | None = None) -> list[Path]:
    """Write ``ckpt`` to ``out`` with each tensor named in ``replacements`` replaced; ``extra``: more files (name →
    a function giving their bytes, called after the tensors are written).  Returns the files written."""
    from tqdm.auto import tqdm

    out = Path(out)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    writers: dict[Path, Callable[[Path], object]] = {}
    bar = tqdm(total=len(ckpt.tensors), desc=desc, unit="tensor", disable=(not progress) or None)
    for file in ckpt.files:
        infos = sorted((i for i in ckpt.tensors.values() if i.file == file), key=lambda i: i.begin)
        writers[out / file.name] = _shard_writer(file, infos, replacements, bar)
    if ckpt.path.is_dir():
        for source in sorted(folder.iterdir()):
            if source.is_file() and not source.name.endswith(WEIGHT_SUFFIXES) and not source.name.startswith("."):
                writers[out / source.name] = lambda tmp, source=source: shutil.copyfile(source, tmp)
        for source in module_files(folder):
            writers[out / source.relative_to(folder)] = lambda tmp, source=source: shutil.copyfile(source, tmp)
    for name, data in (extra or {}).items():
        writers[out / name] = lambda tmp, data=data: Path(tmp).write_bytes(data())
    try:
        return write_files(writers)
    finally:
        bar.close()


def module_files(folder: Path) -> list[Path]:
    """Every file of the sub-folders a sentence-transformers ``modules.json`` names (``1_Pooling/config.json``):
    without them ``SentenceTransformer(out)`` cannot rebuild the pipeline."""
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


def _shard_writer(file: Path, infos: list[TensorInfo], replacements: dict[str, Replacement], bar):
    """A writer for one output shard: the source shard's header (same entries and offsets), then each tensor's
    bytes in file order, replaced where asked."""
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
                replace = replacements.get(info.name)
                handle.write(bytes(read_raw(info)) if replace is None else _stored_bytes(info, replace(info)))
                bar.update(1)

    return write


def _metadata(file: Path) -> dict | None:
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length)).get("__metadata__")


def _stored_bytes(info: TensorInfo, weight: torch.Tensor) -> bytes:
    """The new weight in the stored dtype and shape, as the file's bytes."""
    stored = next((dtype for dtype, name in SAFETENSORS_DTYPE.items() if name == info.dtype), None)
    if stored is None or tuple(weight.shape) != tuple(info.shape):
        raise LayerscopeError(f"{info.file}: {info.name}: cannot write back {info.dtype} {list(info.shape)}")
    weight = weight.to(stored).contiguous()
    return weight.view(torch.uint8).numpy().tobytes() if weight.numel() else b""
