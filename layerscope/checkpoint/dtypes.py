"""safetensors dtype strings: bit sizes and how each decodes to a torch tensor.

Every dtype the safetensors format defines is listed, so any valid file opens.  Floating dtypes
decode to real values; sub-byte floats (F4) are unpacked here; F6 has no bit-packing layout
layerscope can trust and complex numbers are not weights, so those tensors are refused one by
one (the rest of the file stays readable).
"""

from __future__ import annotations

import torch

BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
    "C64": 64,
}

TORCH_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "C64": torch.complex64,
}

# Real-valued dtypes whose tensors can be analysed (F4 through its own decoder).
FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                      "F8_E8M0", "F4"})
# Tensors of these dtypes are readable but not decoded: their bytes come back as uint8.
UNDECODED = frozenset({"F6_E2M3", "F6_E3M2"})
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def nbytes(dtype: str, numel: int) -> int | None:
    """Bytes ``numel`` elements take, or None when they do not end on a byte boundary."""
    bits = BITS[dtype] * numel
    return bits // 8 if bits % 8 == 0 else None


def decode_f4(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """E2M1 codes two per byte, the first element in the low nibble, as float32."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    codes = torch.stack([raw & 0x0F, raw >> 4], dim=-1).reshape(-1).to(torch.long)
    return lut[codes].reshape(shape)
