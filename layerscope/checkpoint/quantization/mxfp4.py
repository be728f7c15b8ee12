"""MXFP4 (gpt-oss): two E2M1 codes per byte in blocks of 32, one E8M0 exponent per block."""

from __future__ import annotations

import torch

from layerscope.checkpoint.dtypes import E2M1_VALUES
from layerscope.checkpoint.quantization.common import LogicalTensor, bad_tensor
from layerscope.checkpoint.reader import TensorInfo

MXFP4_BLOCK = 32


def _mxfp4(base: str, blocks: TensorInfo, scales: TensorInfo) -> LogicalTensor:
    if blocks.dtype != "U8" or scales.dtype != "U8":
        raise bad_tensor(blocks, f"MXFP4 blocks and scales must be U8, got {blocks.dtype} and {scales.dtype}")
    if len(blocks.shape) < 3 or blocks.shape[-1] != MXFP4_BLOCK // 2 or tuple(scales.shape) != blocks.shape[:-1]:
        raise bad_tensor(blocks, f"MXFP4 blocks {list(blocks.shape)} / scales {list(scales.shape)} are not (..., G, 16) "
                           "and (..., G)")
    *lead, groups, _ = blocks.shape
    # Read as (..., out, in); returned transposed to (..., in, out), the layout of gpt-oss's bf16 experts.
    shape = (*lead[:-1], groups * MXFP4_BLOCK, lead[-1])
    return LogicalTensor(base, tuple(shape), "U8", {"blocks": blocks, "scales": scales}, "mxfp4")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.long)  # low nibble first
    values = lut[codes].flatten(-2)  # (..., G, 32)
    exponent = scales.to(torch.float64) - 127
    return (values * torch.exp2(exponent)[..., None]).flatten(-2)


class ExpertStack:
    """A stored 3-D stack of MXFP4 experts, decoded one expert at a time: the codes stay packed (half a byte per
    weight) and each expert becomes a float64 (in, out) matrix only when asked for.  A gpt-oss-20b layer's
    gate_up_proj (32 experts of 2880 × 5760) is 265 MB packed and 4.2 GB decoded at once."""

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        self.blocks, self.scales = blocks, scales
        self.count = int(blocks.shape[0])

    def expert(self, index: int) -> torch.Tensor:
        return dequantize_mxfp4(self.blocks[index], self.scales[index]).mT
