"""Scaled formats: FP8 block-scaled (DeepSeek-V3 ``weight_scale_inv``), compressed-tensors FP8 / int8 with a
per-tensor, per-channel, per-group or per-block ``weight_scale`` (and an optional zero point)."""

from __future__ import annotations

import math

import torch

from layerscope.checkpoint.dtypes import FLOATING
from layerscope.checkpoint.quantization.common import (
    FP8,
    LogicalTensor,
    bad_tensor,
    config_weights,
    group_count,
    need_float,
    no_zero_point,
    positive_int,
)
from layerscope.checkpoint.reader import TensorInfo
from layerscope.errors import LayerscopeError


def _fp8_block(name: str, weight: TensorInfo, scale: TensorInfo, qconfig: dict) -> LogicalTensor:
    if weight.dtype not in FP8:
        raise bad_tensor(weight, f"has weight_scale_inv but dtype {weight.dtype}, not FP8")
    block = qconfig.get("weight_block_size") or [128, 128]
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise LayerscopeError(f"config.json: quantization_config.weight_block_size {block!r} is not [rows, cols]")
    if len(weight.shape) < 2:
        raise bad_tensor(weight, "FP8 block-scaled weight must be at least 2-D")
    *lead, rows, cols = weight.shape
    expected = (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale.shape) != expected:
        raise bad_tensor(scale, f"shape {list(scale.shape)} does not match {list(expected)} "
                          f"({block[0]}x{block[1]} blocks of weight {list(weight.shape)})")
    need_float(scale)
    return LogicalTensor(name, weight.shape, weight.dtype, {"weight": weight, "scale_inv": scale},
                         f"fp8-block{block[0]}x{block[1]}")


def _scaled(name: str, weight: TensorInfo, tensors: dict[str, TensorInfo], qconfig: dict) -> LogicalTensor:
    base = name.removesuffix(".weight")
    scale = tensors[f"{base}.weight_scale"]
    if weight.dtype in FP8:
        kind = "fp8"
    elif weight.dtype == "I8":
        kind = "int8"
    else:
        raise bad_tensor(weight, f"has weight_scale but dtype {weight.dtype} (expected FP8 or I8 codes)")
    need_float(scale)
    if len(weight.shape) != 2:
        raise bad_tensor(weight, f"{kind} weight with weight_scale must be 2-D, got {list(weight.shape)}")
    parts = {"weight": weight, "scale": scale}
    block = _block_of(weight.shape, scale.shape, qconfig)
    if block is not None:
        no_zero_point(tensors, base, f"{kind} block")
        return LogicalTensor(name, weight.shape, weight.dtype, {"weight": weight, "scale_inv": scale},
                             f"{kind}-block{block[0]}x{block[1]}")
    granularity = granularity_of(scale, weight.shape)
    zero = tensors.get(f"{base}.weight_zero_point")
    if zero is not None:
        if tuple(zero.shape) != tuple(scale.shape) or zero.dtype in FLOATING - FP8:
            raise bad_tensor(zero, f"zero point {zero.dtype} {list(zero.shape)} does not match scale {list(scale.shape)}")
        parts["zero"] = zero
    return LogicalTensor(name, weight.shape, weight.dtype, parts, f"{kind}-{granularity}")


def granularity_of(scale: TensorInfo, weight_shape: tuple[int, ...]) -> str:
    rows, cols = weight_shape
    shape = tuple(scale.shape)
    if math.prod(shape) == 1:
        return "tensor"
    if shape in ((rows,), (rows, 1)):
        return "channel"
    if len(shape) == 2 and shape[0] == rows and 1 < shape[1] <= cols:
        return "group"
    raise bad_tensor(scale, f"shape {list(shape)} fits no per-tensor, per-channel, per-group or block scale of weight "
                      f"{list(weight_shape)}")


def _block_of(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], qconfig: dict) -> tuple[int, int] | None:
    """The (rows, cols) block of a 2-D block scale, from a config group's ``block_structure``."""
    rows, cols = weight_shape
    if len(scale_shape) != 2:
        return None
    for weights in config_weights(qconfig):
        block = weights.get("block_structure")
        if (isinstance(block, list) and len(block) == 2 and all(positive_int(b) for b in block)
                and scale_shape == (math.ceil(rows / block[0]), math.ceil(cols / block[1]))):
            return block[0], block[1]
    return None


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block_rows: int, block_cols: int
                         ) -> torch.Tensor:
    """Scaled in place, one block-row at a time: no full-size scale tensor is ever built."""
    out = weight.to(torch.float64)
    cols = out.shape[-1]
    scale = scale_inv.to(torch.float64)
    for bi in range(scale.shape[-2]):
        row_scale = scale[..., bi, :].repeat_interleave(block_cols, -1)[..., :cols]
        out[..., bi * block_rows:(bi + 1) * block_rows, :] *= row_scale[..., None, :]
    return out


def broadcast_scale(scale: torch.Tensor, rows: int, cols: int, group_size: int,
                     g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """A per-tensor ([]), per-channel ([out, 1]) or per-group ([out, 1 or cols]) view that broadcasts
    against the (out, in) weight."""
    scale = scale.to(torch.float64)
    if scale.numel() == 1:
        return scale.reshape(1, 1)
    if scale.numel() == rows:
        return scale.reshape(rows, 1)
    groups = g_idx.to(torch.long) if g_idx is not None else torch.arange(cols) // group_size
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= scale.shape[1]):
        raise LayerscopeError(f"group index {int(groups.max())} is outside the {scale.shape[1]} scale groups")
    return scale[:, groups]


def dequantize_scaled(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                      group_size: int | None = None) -> torch.Tensor:
    """(code − zero) × scale, the scale per tensor ([] / [1]), per output channel ([out] / [out, 1]) or per
    group of input columns ([out, in / g])."""
    rows, cols = weight.shape
    group_size = group_size or math.ceil(cols / group_count(scale))
    out = weight.to(torch.float64)
    if zero is not None:
        out.sub_(broadcast_scale(zero, rows, cols, group_size))
    return out.mul_(broadcast_scale(scale, rows, cols, group_size))
