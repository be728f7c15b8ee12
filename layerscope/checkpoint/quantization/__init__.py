"""Quantized weights: recognise each format by its companion tensors, dequantize one weight at a time.

One module per format family (``scaled``: FP8 and int8 with scales; ``packed``: GPTQ, AWQ and
compressed-tensors pack-quantized; ``mxfp4``; ``bnb``), the grouping of stored tensors into logical
weights and the dispatch in ``logical``; see ``logical``'s docstring for every layout.
"""

from layerscope.checkpoint.quantization.bnb import dequantize_bnb_int8
from layerscope.checkpoint.quantization.common import FP8, LogicalTensor
from layerscope.checkpoint.quantization.logical import load_logical, logical_tensors, quantization_config
from layerscope.checkpoint.quantization.mxfp4 import dequantize_mxfp4
from layerscope.checkpoint.quantization.packed import (
                                                       dequantize_awq,
                                                       dequantize_ct_packed,
                                                       dequantize_gptq,
                                                       unpack_dense,
)
from layerscope.checkpoint.quantization.scaled import dequantize_fp8_block, dequantize_scaled

__all__ = ["FP8", "LogicalTensor", "dequantize_awq", "dequantize_bnb_int8", "dequantize_ct_packed",
           "dequantize_fp8_block", "dequantize_gptq", "dequantize_mxfp4", "dequantize_scaled", "load_logical",
           "logical_tensors", "quantization_config", "unpack_dense"]
