"""The safetensors header, parsed and validated by the format's own rules before anything is trusted.

A file is ``u64 little-endian header length n`` + ``n`` bytes of UTF-8 JSON + the data section.
The rules (those of the ``safetensors`` library, checked against it case by case in
``tests/test_reader_fuzz.py``):

* n ≤ 100,000,000 and 8 + n ≤ file size; the header is UTF-8 JSON, an object, optionally padded
  with trailing whitespace; no NaN/Infinity, no lone surrogate escapes, no raw control characters.
* ``__metadata__``, when present and not null, maps strings to strings.
* Every other key is a tensor: ``{"dtype": one of the format's dtypes, "shape": [u64...],
  "data_offsets": [begin, end]}``; integers are integers (not booleans, not ``2.0`` or ``-0``).
* Sorted by offsets, the tensors tile the data section exactly: the first begins at 0, each begins
  where the previous ended, and the last ends at the end of the file (no gap, no overlap, no
  trailing bytes).  Each one's byte count equals its element count × dtype bits / 8, computed with
  overflow checks in the library's order, and sub-byte dtypes end on a byte boundary.

Where layerscope is stricter than the library (each a file no known writer produces):
duplicate keys anywhere (the library lets a repeated tensor name or metadata key silently win),
fields other than the three above in a tensor entry, integers of 2^63 or more, and zero-size
shapes whose other dimensions multiply past 2^63 (torch cannot represent either).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from layerscope.checkpoint.dtypes import BITS
from layerscope.errors import LayerscopeError
from layerscope.strictjson import json_type, quote, strict_json

HEADER_CAP_BYTES = 100_000_000  # the limit safetensors itself enforces
INT64_LIMIT = 1 << 63
USIZE_LIMIT = 1 << 64
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as its header declares it (offsets relative to the data section)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    entries: list[HeaderEntry]  # in header order
    metadata: dict[str, str] | None
    data_start: int  # 8 + header length


def parse_header(prefix: bytes, file_size: int, where: str) -> Header:
    """Validate the header bytes (``prefix`` starts at offset 0 and holds at least 8 + n bytes)."""
    if file_size < 8:
        raise LayerscopeError(f"{where}: truncated ({file_size} bytes; a safetensors file starts with an 8-byte "
                              "header length)")
    length = int.from_bytes(prefix[:8], "little")
    if length > HEADER_CAP_BYTES:
        raise LayerscopeError(f"{where}: header length {length} exceeds the {HEADER_CAP_BYTES}-byte cap")
    if 8 + length > file_size:
        raise LayerscopeError(f"{where}: header length {length} runs past the end of the file ({file_size} bytes)")
    document = strict_json(bytes(prefix[8:8 + length]), where, "header")
    if not isinstance(document, dict):
        raise LayerscopeError(f"{where}: header is a JSON {json_type(document)}, not an object")
    metadata = _metadata(document.pop("__metadata__", None), where)
    entries = [_entry(name, value, where) for name, value in document.items()]
    available = file_size - 8 - length
    covered = _check_tiling(entries, available, where)
    if covered != available:
        raise LayerscopeError(f"{where}: the last {available - covered} bytes of the data section belong to no tensor "
                              "(trailing bytes, or a header length that does not match the header)")
    return Header(entries=entries, metadata=metadata, data_start=8 + length)


# ---- fields ------------------------------------------------------------------------------------

def _check_text(text: str, what: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LayerscopeError(f"{where}: {what} {quote(text)} holds a lone UTF-16 surrogate escape "
                              "(not a Unicode string)") from None


def _metadata(value: object, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LayerscopeError(f"{where}: field '__metadata__' is a JSON {json_type(value)}, not an object of strings")
    for key, item in value.items():
        _check_text(key, "metadata key", where)
        if not isinstance(item, str):
            raise LayerscopeError(f"{where}: __metadata__[{quote(key)}] is a JSON {json_type(item)}, not a string")
        _check_text(item, f"__metadata__[{quote(key)}]", where)
    return value


def _entry(name: str, value: object, where: str) -> HeaderEntry:
    _check_text(name, "tensor name", where)
    at = f"{where}: tensor {quote(name)}"
    if not isinstance(value, dict):
        raise LayerscopeError(f"{at}: header entry is a JSON {json_type(value)}, not an object")
    unknown = [key for key in value if key not in TENSOR_FIELDS]
    if unknown:
        raise LayerscopeError(f"{at}: unknown field {quote(unknown[0])} (a tensor entry has dtype, shape, "
                              "data_offsets)")
    missing = [key for key in TENSOR_FIELDS if key not in value]
    if missing:
        raise LayerscopeError(f"{at}: field {missing[0]!r} is missing")
    dtype = value["dtype"]
    if not isinstance(dtype, str) or dtype not in BITS:
        shown = quote(dtype) if isinstance(dtype, str) else f"a JSON {json_type(dtype)}"
        raise LayerscopeError(f"{at}: field 'dtype' {shown} is not a safetensors dtype")
    shape = _int_list(value["shape"], None, f"{at}: field 'shape'")
    offsets = _int_list(value["data_offsets"], 2, f"{at}: field 'data_offsets'")
    return HeaderEntry(name=name, dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _int_list(value: object, length: int | None, at: str) -> list[int]:
    if not isinstance(value, list):
        raise LayerscopeError(f"{at} is a JSON {json_type(value)}, not a list of integers")
    if length is not None and len(value) != length:
        raise LayerscopeError(f"{at} has {len(value)} elements, expected {length}")
    for item in value:
        if not _is_int(item):
            raise LayerscopeError(f"{at} holds {_shown(item)}, not a non-negative integer")
        if item >= INT64_LIMIT:
            raise LayerscopeError(f"{at} holds {item}, not below 2^63")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shown(value: object) -> str:
    if isinstance(value, (bool, float, int)) or value is None:
        return json.dumps(value)
    return f"a JSON {json_type(value)}"


# ---- data section ------------------------------------------------------------------------------

def _check_tiling(entries: list[HeaderEntry], available: int, where: str) -> int:
    """Bytes covered by the tensors, which must tile [0, end) in offset order; each size matches."""
    covered, previous = 0, "the start of the data section"
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        at = f"{where}: tensor {quote(entry.name)}"
        if entry.begin != covered or entry.end < entry.begin:
            problem = (f"leaves a gap after {previous}" if entry.begin > covered
                       else f"overlaps {previous}" if entry.begin < covered else "ends before it begins")
            raise LayerscopeError(f"{at}: data_offsets [{entry.begin}, {entry.end}] {problem}; expected it to "
                                  f"begin at {covered}")
        if entry.end > available:
            raise LayerscopeError(f"{at}: data_offsets [{entry.begin}, {entry.end}] run past the end of the data "
                                  f"section ({available} bytes)")
        covered, previous = entry.end, f"tensor {quote(entry.name)}"
        expected = _byte_size(entry, at)
        if entry.end - entry.begin != expected:
            raise LayerscopeError(f"{at}: {entry.end - entry.begin} bytes at data_offsets [{entry.begin}, "
                                  f"{entry.end}] but dtype {entry.dtype} x shape {list(entry.shape)} needs {expected}")
    return covered


def _byte_size(entry: HeaderEntry, at: str) -> int:
    """Element count × bits / 8 with the library's overflow checks (a left fold, then × bits)."""
    count = 1
    for dim in entry.shape:
        count *= dim
        if count >= USIZE_LIMIT:
            raise LayerscopeError(f"{at}: shape {list(entry.shape)} overflows 64 bits")
    bits = count * BITS[entry.dtype]
    if bits >= USIZE_LIMIT:
        raise LayerscopeError(f"{at}: shape {list(entry.shape)} x {BITS[entry.dtype]} bits overflows 64 bits")
    if bits % 8:
        raise LayerscopeError(f"{at}: {entry.dtype} x shape {list(entry.shape)} does not end on a byte boundary")
    if count == 0 and math.prod(d for d in entry.shape if d) * max(BITS[entry.dtype] // 8, 1) >= INT64_LIMIT:
        raise LayerscopeError(f"{at}: zero-size shape {list(entry.shape)} has dimensions too large for torch")
    return bits // 8
