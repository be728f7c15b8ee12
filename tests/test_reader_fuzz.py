"""Differential fuzzing of the safetensors reader against the ``safetensors`` library, on the same bytes.

Hypothesis builds valid files (random dtypes, shapes including zero-size ones, metadata, data laid
out in any order) and mutates them in every field and at the byte level.  For each case:

* the library (``safetensors.deserialize``) accepts → we return exactly its tensors (names, dtypes,
  shapes and bytes), or refuse with a LayerscopeError of a documented stricter rule;
* the library rejects → we refuse with a LayerscopeError;
* we never raise anything else, and decoding each accepted tensor (``read_tensor``) either works or
  raises a LayerscopeError.

CI runs 10,000 cases with a fixed seed (``derandomize``); set ``LAYERSCOPE_FUZZ_EXAMPLES`` for a
longer local run.  The counts are printed.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import deserialize

from layerscope.checkpoint.dtypes import BITS
from layerscope.checkpoint.reader import read_header, read_raw, read_tensor
from layerscope.errors import LayerscopeError

EXAMPLES = int(os.environ.get("LAYERSCOPE_FUZZ_EXAMPLES", "10000"))
# Our refusals of files the library accepts: each is documented in layerscope/checkpoint/header.py
# and the README ("Errors").
STRICTER = ("repeats key", "unknown field", "not below 2^63", "too large for torch", "digits (at most 20)")


# ---- a JSON tree that can also hold text no encoder would write --------------------------------

@dataclass
class Raw:
    text: str


@dataclass
class Obj:
    pairs: list = field(default_factory=list)


def dump(node) -> str:
    if isinstance(node, Raw):
        return node.text
    if isinstance(node, Obj):
        return "{" + ",".join(f"{dump(k) if isinstance(k, Raw) else json.dumps(k)}:{dump(v)}"
                              for k, v in node.pairs) + "}"
    if isinstance(node, list):
        return "[" + ",".join(dump(v) for v in node) + "]"
    return json.dumps(node)


# ---- valid files -------------------------------------------------------------------------------

NAMES = st.text(alphabet=st.sampled_from(list("ab.0_") + ["é", "\n", "\"", "\\", "😀", "\x00"]), max_size=6)
DTYPES = st.sampled_from(sorted(BITS))


@st.composite
def tensor_specs(draw):
    dtype = draw(DTYPES)
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    count = 1
    for d in shape:
        count *= d
    if count * BITS[dtype] % 8:  # keep valid files valid: sub-byte dtypes end on a byte boundary
        shape = [*shape, 2] if BITS[dtype] == 4 else [*shape, 4]
        count = 1
        for d in shape:
            count *= d
    data = draw(st.binary(min_size=count * BITS[dtype] // 8, max_size=count * BITS[dtype] // 8))
    return dtype, shape, data


@st.composite
def valid_files(draw):
    names = draw(st.lists(NAMES, max_size=4, unique=True))
    specs = [draw(tensor_specs()) for _ in names]
    layout = draw(st.permutations(list(range(len(names)))))  # data order differs from header order
    offsets, position = {}, 0
    for i in layout:
        offsets[i] = [position, position + len(specs[i][2])]
        position += len(specs[i][2])
    data = b"".join(specs[i][2] for i in layout)
    header = Obj()
    if draw(st.booleans()):
        metadata = draw(st.dictionaries(NAMES, NAMES, max_size=2))
        header.pairs.append(("__metadata__", Obj(list(metadata.items()))))
    for i, name in enumerate(names):
        dtype, shape, _ = specs[i]
        header.pairs.append((name, Obj([("dtype", dtype), ("shape", shape), ("data_offsets", offsets[i])])))
    return header, data


# ---- mutations ---------------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.integers(-3, 40), st.sampled_from([2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]),
    st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=4),
    st.sampled_from(sorted(BITS) + ["u8", "F8_E4M3FN", "I4", ""]),
    st.lists(st.integers(-1, 5), max_size=3),
    st.sampled_from([Raw("-0"), Raw("2.0"), Raw("1e400"), Raw("NaN"), Raw("Infinity"), Raw("9" * 400),
                     Raw("[" * 200 + "]" * 200), Raw("[true]"), Raw("[1.0, 2]"), Raw("{}"), Raw('"\\ud800"'),
                     Raw("[0, 18446744073709551615]"), Raw("[4294967296, 4294967296, 0]"),
                     Raw("[0, 4294967296, 4294967296]"), Raw("[9223372036854775808, 0]")]),
)


def _entries(header: Obj) -> list:
    return [pair for pair in header.pairs if isinstance(pair[1], Obj) and pair[0] != "__metadata__"]


@st.composite
def mutate_structure(draw, header: Obj) -> Obj:
    kind = draw(st.sampled_from(["field", "element", "drop", "extra", "dup_field", "dup_tensor", "metadata",
                                 "name", "entry"]))
    entries = _entries(header)
    if kind == "metadata":
        header.pairs.insert(0, ("__metadata__", draw(st.one_of(
            JSON_VALUES, st.just(Obj([("k", "v"), ("k", "w")])), st.builds(lambda v: Obj([("k", v)]), JSON_VALUES)))))
        return header
    if not entries:
        return header
    name, entry = draw(st.sampled_from(entries))
    if kind == "field":
        index = draw(st.integers(0, len(entry.pairs) - 1))
        entry.pairs[index] = (entry.pairs[index][0], draw(JSON_VALUES))
    elif kind == "element":  # nudge one shape dimension or offset
        index = draw(st.sampled_from([i for i, (k, _) in enumerate(entry.pairs) if k in ("shape", "data_offsets")]))
        values = entry.pairs[index][1]
        if isinstance(values, list) and values:
            j = draw(st.integers(0, len(values) - 1))
            values[j] = max(0, values[j] + draw(st.sampled_from([-2, -1, 1, 2, 8, 2**40]))) if isinstance(
                values[j], int) else values[j]
    elif kind == "drop":
        entry.pairs.pop(draw(st.integers(0, len(entry.pairs) - 1)))
    elif kind == "extra":
        entry.pairs.append((draw(st.sampled_from(["x", "dtype2", "offsets"])), draw(JSON_VALUES)))
    elif kind == "dup_field":
        entry.pairs.append(draw(st.sampled_from(entry.pairs)))
    elif kind == "dup_tensor":
        header.pairs.append((name, entry))
    elif kind == "name":
        position = header.pairs.index((name, entry))
        header.pairs[position] = (Raw(draw(st.sampled_from(['"\\ud800"', '"\\udc00x"', '"a\\u0000"', '"a\nb"',
                                                            '"\\ud83d\\ude00"', '"a\\tb"']))), entry)
    else:  # the whole entry
        position = header.pairs.index((name, entry))
        header.pairs[position] = (name, draw(JSON_VALUES))
    return header


@st.composite
def mutate_bytes(draw, text: bytes, data: bytes, pad: int) -> tuple[bytes, bytes, int | None]:
    kind = draw(st.sampled_from(["length", "trailing", "truncate", "flip", "prefix", "suffix", "unpadded"]))
    length = None
    if kind == "length":
        length = len(text) + draw(st.sampled_from([-pad - 1, -pad, -1, 1, 2, 8, 2**27]))
    elif kind == "unpadded":  # the header length shortened by its padding: the data section shifts
        length = len(text) - pad if pad else len(text) - 1
    elif kind == "trailing":
        data += draw(st.binary(min_size=1, max_size=3))
    elif kind == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "flip" and text:
        position = draw(st.integers(0, len(text) - 1))
        text = text[:position] + bytes([text[position] ^ draw(st.integers(1, 255))]) + text[position + 1:]
    elif kind == "prefix":
        text = draw(st.sampled_from([b" ", b"\n", b"\xef\xbb\xbf", b"\x00"])) + text
    elif kind == "suffix":
        text += draw(st.sampled_from([b" ", b"\t\r\n", b"x", b"\x00", b"}", b"\xff"]))
    return text, data, length


@st.composite
def cases(draw):
    header, data = draw(valid_files())
    for _ in range(draw(st.integers(0, 2))):
        header = draw(mutate_structure(header))
    text = dump(header).encode("utf-8", "surrogatepass")
    pad = (-len(text)) % 8 if draw(st.booleans()) else 0
    text += b" " * pad
    length = None
    if draw(st.integers(0, 3)) == 0:
        text, data, length = draw(mutate_bytes(text, data, pad))
    length = len(text) if length is None else max(0, length)
    return struct.pack("<Q", length) + text + data


# ---- the two readers ---------------------------------------------------------------------------

def _library(blob: bytes):
    try:
        return sorted((name, t["dtype"], list(t["shape"]), bytes(t["data"])) for name, t in deserialize(blob))
    except Exception as exc:  # noqa: BLE001 - any library error is a rejection
        return exc


def _ours(path):
    try:
        infos = read_header(path)
        tensors = sorted((i.name, i.dtype, list(i.shape), bytes(read_raw(i))) for i in infos)
    except LayerscopeError as exc:
        assert "\n" not in str(exc) or "\\n" in repr(str(exc))
        return exc
    for info in infos:  # decoding each tensor works or refuses cleanly (F6 is not decoded)
        try:
            tensor = read_tensor(info)
            assert tuple(tensor.shape) == info.shape
        except LayerscopeError:
            pass
    return tensors


def _category(message: str) -> str | None:
    return next((rule for rule in STRICTER if rule in message), None)


def test_reader_agrees_with_the_safetensors_library(tmp_path):
    path = tmp_path / "case.safetensors"
    stats: Counter = Counter()

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(blob=cases())
    def check(blob: bytes) -> None:
        path.write_bytes(blob)
        expected, got = _library(blob), _ours(path)
        if isinstance(expected, Exception):
            assert isinstance(got, LayerscopeError), f"library rejects ({expected}) but we accept {blob[:300]!r}"
            stats["both reject"] += 1
        elif isinstance(got, LayerscopeError):
            rule = _category(str(got))
            assert rule is not None, f"we reject a file the library accepts: {got} {blob[:300]!r}"
            stats[f"only we reject: {rule}"] += 1
        else:
            assert got == expected
            stats["both accept, same tensors"] += 1

    check()
    print(f"differential reader fuzz: {sum(stats.values())} cases; " + "; ".join(  # shown with -s or on failure
        f"{k} {v}" for k, v in sorted(stats.items())))
    assert sum(stats.values()) >= min(EXAMPLES, 10000) * 0.9
    assert stats["both accept, same tensors"] > sum(stats.values()) / 10
    assert stats["both reject"] > sum(stats.values()) / 10


@pytest.mark.parametrize("cut", [0, 3, 7])
def test_files_shorter_than_the_length_prefix(tmp_path, cut):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00"[:cut])
    with pytest.raises(LayerscopeError, match="truncated"):
        read_header(path)
