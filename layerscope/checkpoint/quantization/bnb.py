"""bitsandbytes LLM.int8: int8 rows and their absmax ``SCB``."""

from __future__ import annotations

import torch

from layerscope.checkpoint.quantization.common import LogicalTensor, bad_tensor, need_float
from layerscope.checkpoint.reader import TensorInfo


def _bnb_int8(name: str, weight: TensorInfo, scb: TensorInfo) -> LogicalTensor:
    if weight.dtype != "I8" or len(weight.shape) != 2:
        raise bad_tensor(weight, f"bitsandbytes int8 weight must be 2-D I8, got {weight.dtype} {list(weight.shape)}")
    if tuple(scb.shape) != (weight.shape[0],):
        raise bad_tensor(scb, f"SCB shape {list(scb.shape)} is not [{weight.shape[0]}] (one absmax per output row)")
    need_float(scb)
    return LogicalTensor(name, weight.shape, "I8", {"weight": weight, "SCB": scb}, "bnb-int8")


def dequantize_bnb_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 rows: real = q × SCB / 127, in float64."""
    return weight.to(torch.float64).mul_(scb.to(torch.float64)[:, None]).div_(127)
