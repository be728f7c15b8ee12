"""Decoding GGUF tensor bytes: ggml's block quantizations to float tensors, one tensor at a time.

The common types (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) are decoded in torch with the same float32 operations as
``gguf.quants`` (in chunks, so a large tensor never holds all its blocks' intermediates at once); every other
type the gguf package knows goes through ``gguf.quants``.  Llama-family Q/K rows are un-permuted here.
"""

from __future__ import annotations

from layerscope.checkpoint.gguflayout import gguf_package
from layerscope.errors import LayerscopeError


def dequantize(raw: bytes | bytearray | memoryview, ggml_type: str, shape: tuple[int, ...], heads: int | None):
    """float32 (or the stored float dtype) tensor of ``shape`` from one tensor's bytes; Q/K rows un-permuted."""
    import numpy as np
    import torch

    gguf = gguf_package()
    qtype = gguf.GGMLQuantizationType[ggml_type]
    plain = {"F32": torch.float32, "F16": torch.float16, "F64": torch.float64}
    if ggml_type in plain:  # the bytes are the values: no copy
        tensor = torch.frombuffer(raw if isinstance(raw, bytearray) else bytearray(raw),
                                  dtype=plain[ggml_type]).reshape(shape)
    elif ggml_type in TORCH_DECODERS:  # the common types, in torch: the same float32 operations as gguf.quants
        values_per_block = gguf.GGML_QUANT_SIZES[qtype][0]
        tensor = _decode_in_chunks(_blocks(raw, ggml_type), TORCH_DECODERS[ggml_type], values_per_block).reshape(shape)
    else:
        data = np.frombuffer(raw, dtype=np.uint8)
        rows = data.reshape(-1, data.size // max(1, _rows(shape)))
        values = np.empty((rows.shape[0], shape[-1] if shape else 1), dtype=np.float32)
        step = max(1, DECODE_CHUNK_VALUES // values.shape[1])
        try:
            for start in range(0, rows.shape[0], step):
                values[start:start + step] = gguf.quants.dequantize(rows[start:start + step], qtype)
        except NotImplementedError:
            raise LayerscopeError(f"ggml type {ggml_type} cannot be dequantized by the gguf package") from None
        tensor = torch.from_numpy(values).reshape(shape)
    if heads:
        tensor = unpermute_rows(tensor, heads)
    return tensor


# Decoding writes into the finished tensor a few MiB at a time, so a 32000 × 4096 embedding needs its own
# 500 MB and not three times that in temporaries.
DECODE_CHUNK_VALUES = 1 << 21


def _decode_in_chunks(blocks, decoder, values_per_block: int):
    import torch

    out = torch.empty(blocks.shape[0], values_per_block, dtype=torch.float32)
    step = max(1, DECODE_CHUNK_VALUES // values_per_block)
    for start in range(0, blocks.shape[0], step):
        out[start:start + step] = decoder(blocks[start:start + step])
    return out


def _blocks(raw, ggml_type: str):
    """The tensor's bytes as (blocks, bytes per block) uint8, without a copy when the buffer is writable."""
    import torch

    gguf = gguf_package()
    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    buffer = raw if isinstance(raw, bytearray) else bytearray(raw)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(-1, type_size)


def _half(blocks, start: int):
    """The float16 stored at byte ``start`` of every block, as float32 (blocks, 1)."""
    import torch

    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(quants):
    """Each byte's low nibble, then its high nibble, as gguf packs 4-bit blocks (first half, then second half)."""
    import torch

    return torch.cat([quants & 0x0F, quants >> 4], dim=1)


def _q8_0(blocks):
    import torch

    return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _half(blocks, 0)


def _q4_0(blocks):
    import torch

    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).to(torch.float32)


def _q4_1(blocks):
    import torch

    return _half(blocks, 0) * _nibbles(blocks[:, 4:]).to(torch.float32) + _half(blocks, 2)


def _q4_k(blocks):
    """256 values per 144-byte block: float16 d and dmin, 12 bytes holding eight 6-bit scales and eight 6-bit
    mins, then 128 bytes of nibbles (each 32-byte group: low nibbles are one sub-block, high nibbles the next);
    value = d·scale_j·q − dmin·min_j."""
    import torch

    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    low, high, extra = packed[:, 0], packed[:, 1], packed[:, 2]
    scales = torch.cat([low & 0x3F, (extra & 0x0F) | ((low >> 2) & 0x30)], dim=1).to(torch.float32)
    mins = torch.cat([high & 0x3F, (extra >> 4) | ((high >> 2) & 0x30)], dim=1).to(torch.float32)
    groups = blocks[:, 16:].reshape(-1, 4, 1, 32)
    quants = torch.cat([groups & 0x0F, groups >> 4], dim=2).reshape(-1, 8, 32).to(torch.float32)
    step = (_half(blocks, 0) * scales)[:, :, None]
    offset = (_half(blocks, 2) * mins)[:, :, None]
    return (step * quants - offset).reshape(-1, 256)


def _q6_k(blocks):
    """256 values per 210-byte block: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, sixteen int8 scales,
    float16 d; value = d·scale_j·(q − 32) with q the 6-bit (high << 4 | low)."""
    import torch

    low = blocks[:, :128].reshape(-1, 2, 1, 64)
    low = torch.cat([low & 0x0F, low >> 4], dim=2).reshape(-1, 8, 32)
    high = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    high = torch.cat([high & 3, (high >> 2) & 3, (high >> 4) & 3, high >> 6], dim=2).reshape(-1, 8, 32)
    quants = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).to(torch.float32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return ((_half(blocks, 208) * scales)[:, :, None] * quants).reshape(-1, 256)


# Block decoders written in torch for the most common llama.cpp types (multi-threaded, no numpy temporaries);
# each performs gguf.quants' float32 operations in the same order, so the values are bit-identical (tested).
TORCH_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}


def _rows(shape: tuple[int, ...]) -> int:
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows


def unpermute_rows(weight, heads: int):
    """Undo llama.cpp's Q/K permutation: within each head, rows were interleaved as (half, 2) → (2, half)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def decodable_types() -> frozenset[str]:
    """ggml type names the gguf package dequantizes (plus the plain float types)."""
    gguf = gguf_package()
    traits = getattr(gguf.quants, "_type_traits", {})
    return frozenset({"F32", "F16", "F64", *(t.name for t in traits)})
