"""Lazy, validating reader for safetensors checkpoints.

Headers are parsed and checked by us before anything is trusted; tensor bytes are
then read one tensor at a time with positional reads (``os.pread``) into a buffer of
exactly that tensor's size.  We deliberately do not memory-map whole shards: pages of
a mapped multi-GB shard stay resident and would make peak memory scale with the shard,
not with the largest tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerscope.checkpoint.architectures import ARCHITECTURES
from layerscope.checkpoint.configguard import check_config_counts
from layerscope.checkpoint.dtypes import TORCH_DTYPE, UNDECODED, decode_f4, nbytes
from layerscope.checkpoint.header import HEADER_CAP_BYTES, parse_header
from layerscope.errors import LayerscopeError
from layerscope.strictjson import json_type, quote, strict_json

INDEX_NAMES = ("model.safetensors.index.json", "adapter_model.safetensors.index.json")
SINGLE_NAMES = ("model.safetensors", "adapter_model.safetensors")
TORCH_INDEX_NAMES = ("pytorch_model.bin.index.json",)
TORCH_SINGLE_NAMES = ("pytorch_model.bin", "adapter_model.bin")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_DTYPE = {torch_dtype: name for name, torch_dtype in TORCH_DTYPE.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, as declared (and checked) in its header."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file (0 for pickled torch files)
    end: int
    container: str = "safetensors"  # or "torch" (pytorch_model.bin, read through torch.load) or "gguf"
    gguf_heads: int | None = None  # GGUF Q/K: the head count of llama.cpp's row permutation, undone on read
    # container "memory": the tensor, or a function that makes it when read (a weight fused in memory)
    value: torch.Tensor | Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        if self.container in ("safetensors", "gguf"):
            return self.end - self.begin
        return nbytes(self.dtype, self.numel) or 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """A safetensors checkpoint: tensors in layer order, config, and lazy access."""

    path: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)
    tree: object | None = None  # a model in memory: its own module tree (checkpoint.modeltree.ModelTree)
    missing: list[str] = field(default_factory=list)  # weight matrices the architecture expects and the file lacks
    fused_into: dict[str, str] = field(default_factory=dict)  # a model in memory: stored name → its fused parameter

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Materialise one tensor (upcast to ``dtype`` when given)."""
        info = self.tensors[name]
        return read_tensor(info, dtype)

    def fingerprint(self) -> str:
        """sha256 of the tensor names, dtypes and shapes; independent of how it is sharded."""
        canonical = {n: [t.dtype, list(t.shape)] for n, t in sorted(self.tensors.items())}
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        return None


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded integers numerically: layers.9 < layers.10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def open_checkpoint(path: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint folder, a single ``.safetensors``/``.bin`` file, or a hub cache ``models--org--name``
    folder (its newest snapshot, or ``revision``), validating every header."""
    root = Path(path)
    if not root.exists():
        raise LayerscopeError(f"{root}: no such file or folder")
    root = resolve_hub_cache(root, revision)
    if root.is_file() and root.suffix == ".gguf":
        return open_gguf(root)
    files, expected = _locate_files(root)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in (read_header(file) if file.suffix == ".safetensors" else read_torch_index(file)):
            if info.name in tensors:
                raise LayerscopeError(
                    f"{file}: tensor {info.name!r} is also stored in {tensors[info.name].file.name}"
                )
            tensors[info.name] = info
    if expected is not None:
        _check_index_coverage(root, expected, tensors)
    ordered = {name: tensors[name] for name in sorted(tensors, key=natural_key)}
    folder = root if root.is_dir() else root.parent
    config = _read_config(folder)
    if config:
        check_config_counts(config, list(ordered), [info.shape for info in ordered.values()],
                            str(folder / "config.json"))
    return Checkpoint(path=root, files=files, tensors=ordered, config=config)


_GGUF_LAYOUTS: dict[tuple, tuple] = {}  # (path, size, mtime) → (entries, architecture, config, names)


def open_gguf(file: Path) -> Checkpoint:
    """A GGUF file as a checkpoint: transformers' names and config, ggml types as dtypes (see ggufread)."""
    from layerscope.checkpoint.ggufquant import decodable_types
    from layerscope.checkpoint.ggufread import check_against_model, qk_heads, read_gguf

    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _GGUF_LAYOUTS:  # compare and report open a file more than once: parse it once
        table = read_gguf(file)
        entries, architecture = table.tensors, table.architecture
        undecodable = sorted({e.ggml_type for e in entries} - decodable_types() - {"I8", "I16", "I32", "I64"})
        if undecodable:
            first = next(e for e in entries if e.ggml_type in undecodable)
            raise LayerscopeError(f"{file}: tensor {first.gguf_name!r} is stored as ggml type {first.ggml_type}, "
                                  "which the gguf package cannot dequantize")
        config, names, shapes = _gguf_names(file, table)
        missing = check_against_model(file, entries, names, shapes, config)
        if len(_GGUF_LAYOUTS) >= 4:
            _GGUF_LAYOUTS.pop(next(iter(_GGUF_LAYOUTS)))
        _GGUF_LAYOUTS[key] = (entries, architecture, config, names, missing)
    entries, architecture, config, names, missing = _GGUF_LAYOUTS[key]
    config = dict(config)
    tensors: dict[str, TensorInfo] = {}
    for entry in entries:
        name = names.get(entry.gguf_name, entry.gguf_name)  # unmapped (rope_freqs, …) keep their GGUF names
        if name in tensors:
            raise LayerscopeError(f"{file}: tensors {tensors[name].name!r} and {entry.gguf_name!r} both map to {name!r}")
        tensors[name] = TensorInfo(name=name, file=file, dtype=entry.ggml_type, shape=entry.shape, begin=entry.begin,
                                   end=entry.end, container="gguf",
                                   gguf_heads=qk_heads(entry.gguf_name, config, architecture))
    ordered = {name: tensors[name] for name in sorted(tensors, key=natural_key)}
    return Checkpoint(path=file, files=[file], tensors=ordered, config=config, missing=list(missing))


def _gguf_names(file: Path, table) -> tuple[dict, dict[str, str], dict[str, list[int]]]:
    """The config, and the GGUF → transformers names and shapes: from the layout cache when this layout was seen,
    else derived (transformers' import and a meta-device build) and stored there."""
    from layerscope.checkpoint import layoutcache
    from layerscope.checkpoint.ggufread import gguf_config, transformers_names

    key = layoutcache.layout_key(table.tensors, table.values, table.array_lengths)
    cached = layoutcache.load(key)
    if cached is not None:
        return cached
    config = gguf_config(file, table)
    # the metadata is as untrusted as a config.json: its counts are checked before a model is built from it
    check_config_counts(config, [e.gguf_name for e in table.tensors], [e.shape for e in table.tensors],
                        f"{file} (GGUF metadata)")
    names, shapes = transformers_names(file, config, table.architecture)
    layoutcache.store(key, config, names, shapes)
    return config, names, shapes


def resolve_hub_cache(root: Path, revision: str | None) -> Path:
    """``models--org--name`` (a Hugging Face hub cache entry) → the snapshot folder to read."""
    snapshots = root / "snapshots"
    if not (root.is_dir() and root.name.startswith("models--") and snapshots.is_dir()):
        if revision is not None:
            raise LayerscopeError(f"--revision {revision!r}: {root} is not a hub cache folder (models--org--name)")
        return root
    if revision is not None:
        ref = root / "refs" / revision
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
        chosen = snapshots / commit
        if "/" in commit or not chosen.is_dir():
            known = ", ".join(sorted(p.name for p in snapshots.iterdir())) or "none"
            raise LayerscopeError(f"{root}: revision {revision!r} has no snapshot (snapshots: {known})")
        return chosen
    main_ref = root / "refs" / "main"
    if main_ref.is_file() and (snapshots / main_ref.read_text(encoding="utf-8").strip()).is_dir():
        return snapshots / main_ref.read_text(encoding="utf-8").strip()
    candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    if not candidates:
        raise LayerscopeError(f"{root}: hub cache folder has no snapshots")
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.name))


def _locate_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files to read and, when an index names them, the tensor→shard map."""
    if root.is_file():
        if root.suffix not in (".safetensors", *TORCH_SUFFIXES):
            raise LayerscopeError(f"{root}: not a .safetensors or pytorch .bin file")
        return [root], None
    for index_name in (*INDEX_NAMES, *TORCH_INDEX_NAMES):
        index_path = root / index_name
        if index_path.exists():
            weight_map = _read_index(index_path)
            shards = sorted(set(weight_map.values()), key=natural_key)
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise LayerscopeError(f"{index_path}: shard {missing[0]!r} is listed but missing")
            return [root / s for s in shards], weight_map
    for single in (*SINGLE_NAMES, *TORCH_SINGLE_NAMES):
        if (root / single).is_file():
            return [root / single], None
    found = sorted(root.glob("*.safetensors"), key=lambda p: natural_key(p.name))
    if found:
        return found, None
    gguf = sorted(root.glob("*.gguf"))
    if gguf:
        raise LayerscopeError(f"{root}: holds no safetensors checkpoint but {len(gguf)} GGUF file(s); scan the file "
                              f"itself ({root / gguf[0].name})")
    raise LayerscopeError(f"{root}: no checkpoint found (expected model.safetensors, sharded *.safetensors with "
                          "model.safetensors.index.json, or pytorch_model.bin)")


def read_torch_index(file: Path) -> list[TensorInfo]:
    """Names, dtypes and shapes of a pickled torch state dict, memory-mapped (no tensor data is read)."""
    state = _torch_load(file)
    infos = []
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise LayerscopeError(f"{file}: entry {_short(name)} is not a named tensor (not a state dict?)")
        dtype = SAFETENSORS_DTYPE.get(tensor.dtype)
        if dtype is None:
            raise LayerscopeError(f"{file}: tensor {name!r} has dtype {tensor.dtype}, which layerscope does not read")
        infos.append(TensorInfo(name=name, file=file, dtype=dtype, shape=tuple(tensor.shape), begin=0, end=0,
                                container="torch"))
    return infos


def _torch_load(file: Path) -> dict:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LayerscopeError(f"{file}: cannot read as a torch checkpoint with torch.load(mmap=True, "
                              f"weights_only=True) ({type(exc).__name__}: {reason[:160]}); re-save it with "
                              "save_pretrained(safe_serialization=True)") from None
    if not isinstance(state, dict):
        raise LayerscopeError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _read_index(index_path: Path) -> dict[str, str]:
    index = strict_json(index_path.read_bytes(), str(index_path))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LayerscopeError(f"{index_path}: field 'weight_map' is missing or empty")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise LayerscopeError(f"{index_path}: weight_map[{name!r}] is not a shard file name")
    return weight_map


def _check_index_coverage(root: Path, expected: dict[str, str], found: dict[str, TensorInfo]) -> None:
    for name, shard in expected.items():
        info = found.get(name)
        if info is None:
            raise LayerscopeError(f"{root}: index lists tensor {name!r} in {shard} but no shard holds it")
        if info.file.name != shard:
            raise LayerscopeError(f"{root}: index puts {name!r} in {shard} but it is in {info.file.name}")


# config.json fields layerscope reads, and the JSON types they must have (None: may be null).
CONFIG_TEXT_FIELDS = ("model_type",)
HEAD_FIELDS = ("num_attention_heads", "n_head", "n_heads", "hidden_size", "n_embd", "d_model", "num_key_value_heads",
               "n_head_kv", "num_kv_heads", "head_dim")
CONFIG_INT_FIELDS = tuple(sorted({key for arch in ARCHITECTURES for stack in arch["stacks"] for key in stack["count"]}
                                  | {"num_hidden_layers", "n_layer", "num_layers", *HEAD_FIELDS}))


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return {}
    config = strict_json(config_path.read_bytes(), str(config_path))
    if not isinstance(config, dict):
        raise LayerscopeError(f"{config_path}: is a JSON {json_type(config)}, expected an object")
    check_config_fields(config, str(config_path))
    return config


def check_config_fields(config: dict, where: str) -> None:
    """The fields layerscope uses must have their documented types (a string ``architectures`` would
    otherwise read as a list of letters)."""
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise LayerscopeError(f"{where}: field 'architectures' is a JSON {json_type(archs)}, expected a list of "
                              "strings")
    for key in CONFIG_TEXT_FIELDS:
        if config.get(key) is not None and not isinstance(config[key], str):
            raise LayerscopeError(f"{where}: field {key!r} is a JSON {json_type(config[key])}, expected a string")
    for key in CONFIG_INT_FIELDS:
        value = config.get(key)
        if value is None:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise LayerscopeError(f"{where}: field {key!r} is {json.dumps(value)[:40]}, expected a non-negative "
                                  "integer")
        if value >= 2**31:
            raise LayerscopeError(f"{where}: field {key!r} is {value:,}: too large (at most {2**31 - 1:,})")
    if config.get("quantization_config") is not None and not isinstance(config["quantization_config"], dict):
        raise LayerscopeError(f"{where}: field 'quantization_config' is a JSON "
                              f"{json_type(config['quantization_config'])}, expected an object")


def read_header(file: Path) -> list[TensorInfo]:
    """Parse and validate one safetensors header (see :mod:`layerscope.checkpoint.header`); return its
    tensors in header order with absolute byte offsets."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) == 8 and int.from_bytes(prefix, "little") <= HEADER_CAP_BYTES:
            prefix += handle.read(int.from_bytes(prefix, "little"))
    header = parse_header(prefix, size, str(file))
    return [TensorInfo(name=e.name, file=file, dtype=e.dtype, shape=e.shape, begin=header.data_start + e.begin,
                       end=header.data_start + e.end) for e in header.entries]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_raw(info: TensorInfo) -> bytearray:
    """Exactly one safetensors tensor's bytes, with positional reads."""
    buffer = bytearray(info.nbytes)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        view, done = memoryview(buffer), 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.begin + done)
            if got <= 0:
                raise LayerscopeError(f"{info.file}: tensor {quote(info.name)} ends early (file changed while "
                                      "reading?)")
            done += got
    finally:
        os.close(fd)
    return buffer


def read_tensor(info: TensorInfo, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Read exactly one tensor's bytes from disk; optionally upcast (e.g. BF16 → float32)."""
    if info.container == "memory":
        tensor = info.value() if callable(info.value) else info.value
        return tensor if dtype is None else tensor.to(dtype)
    if info.container == "torch":
        tensor = _torch_load(info.file)[info.name].clone()  # the mapping is dropped; only this tensor stays
        return tensor if dtype is None else tensor.to(dtype)
    buffer = read_raw(info)
    if info.container == "gguf":
        from layerscope.checkpoint.ggufquant import dequantize

        try:
            tensor = dequantize(buffer, info.dtype, info.shape, info.gguf_heads)
        except LayerscopeError as exc:
            raise LayerscopeError(f"{info.file}: tensor {info.name!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - gguf.quants raises ValueError, IndexError, ... on damaged blocks
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise LayerscopeError(f"{info.file}: tensor {info.name!r} ({info.dtype}, shape {list(info.shape)}) cannot "
                                  f"be dequantized ({type(exc).__name__}: {reason})") from None
        return tensor if dtype is None else tensor.to(dtype)
    if info.dtype in UNDECODED:
        raise LayerscopeError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype} (packed 6-bit floats), "
                              "which layerscope does not decode")
    if info.dtype == "F4":
        tensor = decode_f4(torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8),
                           info.shape)
        return tensor if dtype is None else tensor.to(dtype)
    if info.numel == 0:
        tensor = torch.empty(info.shape, dtype=TORCH_DTYPE[info.dtype])
    else:
        tensor = torch.frombuffer(buffer, dtype=TORCH_DTYPE[info.dtype]).reshape(info.shape)
    return tensor if dtype is None else tensor.to(dtype)
