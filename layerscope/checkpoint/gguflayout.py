"""A GGUF file's layout checked as llama.cpp's loader checks it, before the gguf package's reader walks it.

gguf's reader trusts the file's counts and lengths: a string or array declared longer than the file makes it
allocate or loop for minutes, an offset near 2^64 wraps inside its uint64 arithmetic, and a tensor count that
disagrees with the table shifts the data section.  This module walks the header with Python integers (no
wrap-around) and refuses, naming the file and the field:

* a string or array longer than the bytes left in the file, an array of arrays, an unknown value type;
* more than ``MAX_DIMS`` dimensions, a zero or absurd dimension, an unknown ggml type, and the integer ggml
  types (I8–I64: not weights);
* a tensor offset that is not a multiple of ``general.alignment``, a tensor that runs past the end of the
  data, or into the next tensor (a type changed from F16 to F32 reads its neighbour's bytes);
* a tensor count that disagrees with the table: the bytes between the table and the data must be padding,
  and the data section must end with the last tensor (within one alignment).

Scalars and strings are decoded, and so are the short arrays outside ``tokenizer.*`` (per-layer head counts
and the like); the tokenizer's arrays are skipped by their length (fixed-size items) or item by item (strings)
without decoding them, and only their lengths are kept, so the 49k-entry arrays of a real file cost
milliseconds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from layerscope.errors import LayerscopeError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = (1 << 63) - 1
DEFAULT_ALIGNMENT = 32
FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
FIXED_SIZES = {value_type: struct.calcsize(fmt) for value_type, fmt in FORMATS.items()}  # GGUFValueType → bytes
FLOATS, BOOL = frozenset({6, 12}), 7
STRING, ARRAY, UINT32 = 8, 9, 4
DECODED_ARRAY_ITEMS = 4096  # longer arrays, and every tokenizer array, are skipped by length
INTEGER_TYPES = frozenset({"I8", "I16", "I32", "I64"})
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    ggml_type: str
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class Layout:
    version: int
    alignment: int
    data_start: int
    tensors: list[TensorInfo]
    values: dict[str, object]  # metadata: scalars, strings and the short non-tokenizer arrays (as lists)
    array_lengths: dict[str, int]  # every array's length, decoded or not


class _Cursor:
    def __init__(self, file: Path, data, size: int):
        self.file, self.data, self.size, self.pos = file, data, size, 0

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.pos + count > self.size:
            raise LayerscopeError(f"{self.file}: {what} needs {count:,} bytes at offset {self.pos:,}, but only "
                                  f"{max(0, self.size - self.pos):,} are left in the file (truncated or damaged)")

    def unpack(self, fmt: str, what: str):
        width = struct.calcsize(fmt)
        self.need(width, what)
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += width
        return value

    def string(self, what: str) -> str:
        length = self.unpack("<Q", f"{what} (length)")
        self.need(length, f"{what} ({length:,} bytes declared)")
        raw = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LayerscopeError(f"{self.file}: {what} is not UTF-8 text (damaged header)") from None


def read_layout(file: Path) -> Layout:
    """The file's header, metadata and tensor table, checked (see the module docstring)."""
    try:
        size = file.stat().st_size
        handle = open(file, "rb")
    except OSError as exc:
        raise LayerscopeError(f"{file}: cannot read ({exc.strerror or exc})") from None
    with handle:
        if size < 24:
            raise LayerscopeError(f"{file}: {size} bytes, shorter than a GGUF header (24 bytes)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _walk(_Cursor(file, data, size))


def _walk(cursor: _Cursor) -> Layout:
    file = cursor.file
    if bytes(cursor.data[:4]) != MAGIC:
        raise LayerscopeError(f"{file}: not a GGUF file (magic {bytes(cursor.data[:4])!r}, expected {MAGIC!r})")
    cursor.pos = 4
    version = cursor.unpack("<I", "the version")
    if version not in VERSIONS:
        raise LayerscopeError(f"{file}: GGUF version {version} (this reader knows {', '.join(map(str, VERSIONS))})")
    tensor_count = cursor.unpack("<Q", "the tensor count")
    kv_count = cursor.unpack("<Q", "the metadata count")
    # every tensor entry and key/value takes at least 8 + 4 bytes: a count the file cannot hold is refused now
    for count, what in ((tensor_count, "tensor count"), (kv_count, "metadata count")):
        if count * 12 > cursor.size - cursor.pos:
            raise LayerscopeError(f"{file}: {what} {count:,} is too large for a file of {cursor.size:,} bytes")
    alignment = DEFAULT_ALIGNMENT
    values: dict[str, object] = {}
    array_lengths: dict[str, int] = {}
    for index in range(kv_count):
        key = cursor.string(f"metadata key {index}")
        value_type = cursor.unpack("<I", f"the type of {key!r}")
        if key == "general.alignment":
            if value_type != UINT32:
                raise LayerscopeError(f"{file}: general.alignment has value type {value_type}, expected uint32")
            alignment = cursor.unpack("<I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise LayerscopeError(f"{file}: general.alignment {alignment} is not a power of two")
            values[key] = alignment
        elif value_type == ARRAY:
            length, items = _array(cursor, key)
            array_lengths[key] = length
            if items is not None:
                values[key] = items
        else:
            values[key] = _scalar(cursor, value_type, key)
    tensors = [_tensor_info(cursor, index) for index in range(tensor_count)]
    padding = -cursor.pos % alignment
    cursor.need(padding, "the padding before the tensor data")
    if any(bytes(cursor.data[cursor.pos:cursor.pos + padding])):
        raise LayerscopeError(f"{file}: the bytes after the tensor table are not padding: the tensor count "
                              f"({tensor_count:,}) does not match the table")
    data_start = cursor.pos + padding
    _check_placement(file, tensors, alignment, cursor.size - data_start, tensor_count)
    return Layout(version, alignment, data_start, tensors, values, array_lengths)


def _scalar(cursor: _Cursor, value_type: int, what: str):
    """One value as transformers' GGUF loader types it: int, float, bool or str."""
    if value_type == STRING:
        return cursor.string(f"the value of {what!r}")
    if value_type not in FORMATS:
        raise LayerscopeError(f"{cursor.file}: metadata {what!r}: unknown value type {value_type}")
    value = cursor.unpack(FORMATS[value_type], f"the value of {what!r}")
    return bool(value) if value_type == BOOL else float(value) if value_type in FLOATS else int(value)


def _array(cursor: _Cursor, key: str) -> tuple[int, list | None]:
    """An array's length, and its items when it is short and not the tokenizer's (else skipped undecoded)."""
    item_type = cursor.unpack("<I", f"the item type of {key!r}")
    count = cursor.unpack("<Q", f"the length of {key!r}")
    if item_type == ARRAY:
        raise LayerscopeError(f"{cursor.file}: metadata {key!r} is an array of arrays (not valid GGUF)")
    if item_type not in FIXED_SIZES and item_type != STRING:
        raise LayerscopeError(f"{cursor.file}: metadata {key!r}: unknown array item type {item_type}")
    least = FIXED_SIZES.get(item_type, 8)  # a string takes its 8-byte length at least
    cursor.need(count * least, f"array {key!r} ({count:,} {'strings' if item_type == STRING else 'items'} declared)")
    if count <= DECODED_ARRAY_ITEMS and not key.startswith("tokenizer."):
        return count, [_scalar(cursor, item_type, f"{key}[{item}]") for item in range(count)]
    if item_type == STRING:
        _skip_strings(cursor, count, key)
    else:
        cursor.pos += count * least
    return count, None


def _skip_strings(cursor: _Cursor, count: int, key: str) -> None:
    """``count`` length-prefixed strings, walked in one tight loop (a tokenizer's 49k tokens and merges)."""
    data, size, pos = cursor.data, cursor.size, cursor.pos
    length_at = _U64.unpack_from
    for item in range(count):
        if pos + 8 > size:
            cursor.pos = pos
            cursor.need(8, f"item {item} of {key!r} (length)")
        length = length_at(data, pos)[0]
        if pos + 8 + length > size:
            raise LayerscopeError(f"{cursor.file}: item {item} of {key!r} ({length:,} bytes declared) runs past "
                                  f"the end of the file at offset {pos:,} (truncated or damaged)")
        pos += 8 + length
    cursor.pos = pos


def gguf_package():
    try:
        import gguf
    except ImportError:
        raise LayerscopeError("reading GGUF files needs the gguf package: pip install 'layerscope[gguf]'") from None
    return gguf


def _tensor_info(cursor: _Cursor, index: int) -> TensorInfo:
    gguf = gguf_package()
    file = cursor.file
    name = cursor.string(f"the name of tensor {index}")
    n_dims = cursor.unpack("<I", f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise LayerscopeError(f"{file}: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = tuple(cursor.unpack("<Q", f"a dimension of tensor {name!r}") for _ in range(n_dims))
    elements = 1
    for d in dims:
        if d == 0:
            raise LayerscopeError(f"{file}: tensor {name!r} has shape {list(dims)} (a zero dimension)")
        elements *= d
    if elements > MAX_ELEMENTS:
        raise LayerscopeError(f"{file}: tensor {name!r} has shape {list(dims)}: too large ({elements:,} elements)")
    type_id = cursor.unpack("<I", f"the ggml type of tensor {name!r}")
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise LayerscopeError(f"{file}: tensor {name!r} has ggml type {type_id}, unknown to the gguf package") from None
    if qtype.name in INTEGER_TYPES:
        raise LayerscopeError(f"{file}: tensor {name!r} holds integers (ggml type {qtype.name}), not weights")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        raise LayerscopeError(f"{file}: tensor {name!r}: {dims[0]} values per row is not a multiple of "
                              f"{qtype.name}'s block of {block}")
    offset = cursor.unpack("<Q", f"the offset of tensor {name!r}")
    return TensorInfo(name, dims, qtype.name, offset, elements // block * type_size)


def _check_placement(file: Path, tensors: list[TensorInfo], alignment: int, data_size: int, declared: int) -> None:
    for tensor in tensors:
        if tensor.offset % alignment:
            raise LayerscopeError(f"{file}: tensor {tensor.name!r} starts at data offset {tensor.offset:,}, not a "
                                  f"multiple of general.alignment ({alignment})")
        if tensor.offset + tensor.nbytes > data_size:
            raise LayerscopeError(f"{file}: tensor {tensor.name!r} ({tensor.ggml_type}, {tensor.nbytes:,} bytes at "
                                  f"data offset {tensor.offset:,}) runs past the end of the file's "
                                  f"{data_size:,} data bytes (truncated or damaged)")
    ordered = sorted(tensors, key=lambda t: t.offset)
    for before, after in zip(ordered, ordered[1:]):
        if before.offset + before.nbytes > after.offset:
            raise LayerscopeError(f"{file}: tensor {before.name!r} ({before.ggml_type}, {before.nbytes:,} bytes at "
                                  f"data offset {before.offset:,}) runs into tensor {after.name!r} at "
                                  f"{after.offset:,}: its type or shape does not match its bytes")
    end = ordered[-1].offset + ordered[-1].nbytes if ordered else 0
    if data_size - end >= alignment:
        raise LayerscopeError(f"{file}: {data_size - end:,} bytes of data after the last tensor: the tensor count "
                              f"({declared:,}) does not match the table")
