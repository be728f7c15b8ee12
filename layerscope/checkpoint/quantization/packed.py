"""Packed integer formats: GPTQ (v1/v2, act-order ``g_idx``), AWQ (interleaved nibbles) and compressed-tensors
pack-quantized (any width 1–8, packed zero points)."""

from __future__ import annotations

import math

import numpy as np
import torch

from layerscope.checkpoint.quantization.common import (
    LogicalTensor,
    bad_tensor,
    config_weights,
    need_float,
    positive_int,
)
from layerscope.checkpoint.quantization.scaled import broadcast_scale, granularity_of
from layerscope.checkpoint.reader import TensorInfo, read_tensor
from layerscope.errors import LayerscopeError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a packed int holds output column AWQ_ORDER[k]


def _ct_packed(base: str, packed: TensorInfo, tensors: dict[str, TensorInfo], qconfig: dict,
               method: str | None) -> LogicalTensor:
    if method != "compressed-tensors":
        raise bad_tensor(packed, f"weight_packed needs quantization_config.quant_method compressed-tensors (found {method!r})")
    if packed.dtype != "I32":
        raise bad_tensor(packed, f"packed {packed.dtype} codes (nvfp4/mxfp4 pack formats) cannot be dequantized by "
                           "layerscope; pack-quantized int codes are I32")
    if len(packed.shape) != 2:
        raise bad_tensor(packed, f"pack-quantized weight must be 2-D, got {list(packed.shape)}")
    parts = {"packed": packed}
    for role in ("scale", "shape", "zero_point", "g_idx"):
        info = tensors.get(f"{base}.weight_{role}")
        if info is None and role in ("scale", "shape"):
            raise bad_tensor(packed, f"pack-quantized weight has no {base}.weight_{role}")
        if info is not None:
            parts[role] = info
    need_float(parts["scale"])
    shape_info = parts["shape"]
    if shape_info.dtype not in ("I64", "I32") or tuple(shape_info.shape) != (2,):
        raise bad_tensor(shape_info, f"weight_shape must be 2 integers, got {shape_info.dtype} {list(shape_info.shape)}")
    rows, cols = (int(v) for v in read_tensor(shape_info).tolist())
    if rows != packed.shape[0] or cols < 1:
        raise bad_tensor(shape_info, f"weight_shape [{rows}, {cols}] does not fit weight_packed {list(packed.shape)}")
    bits = _packed_bits(packed, cols, qconfig)
    scale = parts["scale"]
    granularity = granularity_of(scale, (rows, cols))
    if "zero_point" in parts:
        zero = parts["zero_point"]
        groups = 1 if granularity in ("tensor", "channel") else scale.shape[1]
        expected = (math.ceil(rows * bits / 32), groups)
        if zero.dtype != "I32" or tuple(zero.shape) != expected:
            raise bad_tensor(zero, f"packed zero point {zero.dtype} {list(zero.shape)} is not I32 {list(expected)}")
    if "g_idx" in parts and (tuple(parts["g_idx"].shape) != (cols,) or parts["g_idx"].dtype not in ("I32", "I64")):
        raise bad_tensor(parts["g_idx"], f"weight_g_idx {parts['g_idx'].dtype} {list(parts['g_idx'].shape)} is not "
                                   f"an integer [{cols}]")
    del parts["shape"]
    return LogicalTensor(f"{base}.weight", (rows, cols), "I32", parts, f"ct-int{bits}-{granularity}")


def _packed_bits(packed: TensorInfo, cols: int, qconfig: dict) -> int:
    """Code width: the config's int num_bits whose dense packing of ``cols`` codes fills the stored words."""
    declared = {w.get("num_bits") for w in config_weights(qconfig) if w.get("type", "int") == "int"}
    fitting = sorted(b for b in declared if positive_int(b) and b <= 8 and math.ceil(cols * b / 32) == packed.shape[1])
    if len(fitting) != 1:
        raise bad_tensor(packed, f"{packed.shape[1]} int32 words per row of {cols} codes fit "
                           f"{'no' if not fitting else 'more than one'} int num_bits of the config groups "
                           f"({sorted(b for b in declared if isinstance(b, int))})")
    return fitting[0]


def _packed_int(base: str, tensors: dict[str, TensorInfo], qconfig: dict, method: str | None) -> LogicalTensor:
    qweight = tensors[f"{base}.qweight"]
    if method not in ("gptq", "awq"):
        raise bad_tensor(qweight, f"packed qweight needs quantization_config.quant_method gptq or awq in config.json "
                            f"(found {method!r})")
    bits = qconfig.get("bits", qconfig.get("w_bit", 4))
    if bits not in (2, 4, 8):
        raise bad_tensor(qweight, f"{method} with bits={bits!r} is not supported (2, 4 or 8)")
    if method == "awq" and bits != 4:
        raise bad_tensor(qweight, f"AWQ with bits={bits!r} is not supported (AWQ packs 4-bit codes)")
    if method == "awq" and str(qconfig.get("version", "gemm")).lower() != "gemm":
        raise bad_tensor(qweight, f"AWQ version {qconfig.get('version')!r} is not supported (GEMM packing only)")
    parts = {"qweight": qweight}
    for part in ("qzeros", "scales", "g_idx"):
        info = tensors.get(f"{base}.{part}")
        if info is None and part != "g_idx":
            raise bad_tensor(qweight, f"{method} weight has no {base}.{part}")
        if info is not None:
            parts[part] = info
    if qweight.dtype != "I32" or parts["qzeros"].dtype != "I32":
        raise bad_tensor(qweight, f"{method} qweight/qzeros must be I32")
    need_float(parts["scales"])
    per_int = 32 // bits
    if method == "gptq":
        in_f, out_f = qweight.shape[0] * per_int, qweight.shape[1]
    else:
        in_f, out_f = qweight.shape[0], qweight.shape[1] * per_int
    groups = parts["scales"].shape[0] if len(parts["scales"].shape) == 2 else -1
    if tuple(parts["scales"].shape) != (groups, out_f) or tuple(parts["qzeros"].shape) != (groups, out_f // per_int):
        raise bad_tensor(parts["scales"], f"scales {list(parts['scales'].shape)} / qzeros {list(parts['qzeros'].shape)} "
                                    f"do not fit a {out_f}x{in_f} {method} weight")
    if "g_idx" in parts and tuple(parts["g_idx"].shape) != (in_f,):
        raise bad_tensor(parts["g_idx"], f"g_idx shape {list(parts['g_idx'].shape)} is not [{in_f}]")
    version = "v2" if str(qconfig.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else "v1"
    label = f"{method}-int{bits}" + (f"-{version}" if method == "gptq" else "")
    return LogicalTensor(f"{base}.weight", (out_f, in_f), "I32", parts, label)


def unpack_dense(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Codes 0..2^bits−1 packed densely along the last dimension of int32 words (code i at bit i·bits
    of its row, low bits first), as (rows, count) int64."""
    rows = packed.shape[0]
    if 32 % bits == 0:  # no code straddles a word: shift fields out of each word
        per_word = 32 // bits
        words = packed.to(torch.int64) & 0xFFFFFFFF
        fields = torch.stack([(words >> (bits * k)) & ((1 << bits) - 1) for k in range(per_word)], dim=-1)
        return fields.reshape(rows, -1)[:, :count]
    little = packed.contiguous().numpy().astype("<i4", copy=False).view(np.uint8)
    bit_array = np.unpackbits(little.reshape(rows, -1), axis=1, bitorder="little")[:, :count * bits]
    weights = (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(bit_array.reshape(rows, count, bits).astype(np.int64) @ weights)


def dequantize_ct_packed(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                         g_idx: torch.Tensor | None, bits: int, shape: tuple[int, ...], group_size: int
                         ) -> torch.Tensor:
    rows, cols = shape
    offset = 1 << (bits - 1)
    out = unpack_dense(packed, bits, cols).to(torch.float64).sub_(offset)
    if zero_point is not None:
        zero = (unpack_dense(zero_point.T.contiguous(), bits, rows).T - offset).to(torch.float64)
        out.sub_(broadcast_scale(zero, rows, cols, group_size, g_idx))
    return out.mul_(broadcast_scale(scale, rows, cols, group_size, g_idx))


def _unpack_into(out: torch.Tensor, packed: torch.Tensor, bits: int, dim: int, order: torch.Tensor) -> None:
    """Write field k of every int32 (low bits first) to position order[k] of its group along ``dim``."""
    per_int = 32 // bits
    for k in range(per_int):
        field = ((packed >> (bits * k)) & ((1 << bits) - 1)).to(out.dtype)
        target = int(order[k])
        if dim == 0:
            out[target::per_int] = field
        else:
            out[:, target::per_int] = field


def _apply_groups(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(q − zero) × scale in place, one group of input rows at a time (q is (in, out))."""
    scales = scales.to(torch.float64)
    for g in range(scales.shape[0]):
        rows = (groups == g).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        if int(rows[-1]) - int(rows[0]) + 1 == rows.numel():  # contiguous group: update the slice in place
            block = q[int(rows[0]):int(rows[-1]) + 1]
            block.sub_(zeros[g]).mul_(scales[g])
        else:
            q[rows] = (q[rows] - zeros[g]) * scales[g]
    return q


def _zeros(qzeros: torch.Tensor, bits: int, order: torch.Tensor, offset: int) -> torch.Tensor:
    out = torch.empty(qzeros.shape[0], qzeros.shape[1] * (32 // bits), dtype=torch.float64)
    _unpack_into(out, qzeros, bits, 1, order)
    return out + offset


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                    bits: int, zero_offset: int) -> torch.Tensor:
    per_int = 32 // bits
    natural = torch.arange(per_int)
    q = torch.empty(qweight.shape[0] * per_int, qweight.shape[1], dtype=torch.float64)  # (in, out)
    _unpack_into(q, qweight, bits, 0, natural)
    zeros = _zeros(qzeros, bits, natural, zero_offset)  # (groups, out)
    in_f = q.shape[0]
    if g_idx is None:
        group_size = math.ceil(in_f / scales.shape[0])
        g_idx = torch.arange(in_f) // group_size
    g = g_idx.to(torch.long)
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= scales.shape[0]):
        raise LayerscopeError(f"g_idx holds group {int(g.max())} but there are {scales.shape[0]} groups")
    return _apply_groups(q, zeros, scales, g).T


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    order = torch.tensor(AWQ_ORDER)
    q = torch.empty(qweight.shape[0], qweight.shape[1] * (32 // bits), dtype=torch.float64)  # (in, out)
    _unpack_into(q, qweight, bits, 1, order)
    zeros = _zeros(qzeros, bits, order, 0)
    group_size = math.ceil(q.shape[0] / scales.shape[0])
    return _apply_groups(q, zeros, scales, torch.arange(q.shape[0]) // group_size).T
