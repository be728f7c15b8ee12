"""Quantized weights: recognise each format by its companion tensors, dequantize one weight at a time.

A quantized projection is stored as several tensors (codes plus scales, zeros, indices).  They are
grouped here into one :class:`LogicalTensor` named like the unquantized weight, and turned back
into real values in float64 (exact for every format below: the products of a few-bit code and a
float32/float16 scale are representable).  Companion tensors are consumed and never analysed.

Formats (layouts as the producers write them):

``fp8-block``    ``weight`` F8 (out, in) + ``weight_scale_inv`` F32 (⌈out/b⌉, ⌈in/b⌉); real = code ×
                 scale of its b×b block (DeepSeek-V3, Qwen3-FP8; b from ``weight_block_size``, 128).
``fp8-tensor`` / ``fp8-channel`` / ``fp8-group``
                 compressed-tensors: ``weight`` F8 + ``weight_scale`` of shape [] / [1] (tensor),
                 [out] / [out, 1] (channel) or [out, in/g] (group); real = code × scale.
``int8-channel`` compressed-tensors W8A8: ``weight`` I8 + ``weight_scale`` per channel.
                 Any of these may carry ``weight_zero_point`` (asymmetric): real = (code − zero) × scale.
``fp8-block``    (compressed-tensors spelling) ``weight`` F8 + ``weight_scale`` (⌈out/b₀⌉, ⌈in/b₁⌉), the
                 block from the config group's ``block_structure``.
``ct-int<b>``    compressed-tensors pack-quantized: ``weight_packed`` I32 (out, ⌈in·b/32⌉), codes packed
                 densely along the input dimension (code i at bit i·b of its row, low bits first) and
                 stored as q + 2^(b−1); ``weight_shape`` (out, in); ``weight_scale`` per tensor, channel
                 or group (``weight_g_idx`` for activation order); optional ``weight_zero_point`` packed
                 alike along the output dimension.  real = (q − zero) × scale.
``mxfp4``        ``*_blocks`` U8 (..., out, G, 16): two E2M1 codes per byte, low nibble first, 32 per
                 block along the input dimension; ``*_scales`` U8 (..., out, G) E8M0 exponents;
                 real = fp4 × 2^(scale − 127) (gpt-oss).  Returned as (..., in, out), the layout of
                 gpt-oss's bf16 expert tensors.
``gptq``         ``qweight`` I32 (in·bits/32, out) packed along the input dimension, low bits first;
                 ``qzeros`` I32 (groups, out·bits/32) packed alike; ``scales`` F16 (groups, out);
                 optional ``g_idx`` (in,) group of each input row (else row // group_size).
                 real[o, i] = scale[g, o] × (q[i, o] − z[g, o]), z stored minus one in GPTQ v1.
``awq``          ``qweight`` I32 (in, out·bits/32) packed along the output dimension in AWQ's
                 interleaved order (0, 2, 4, 6, 1, 3, 5, 7); ``qzeros``, ``scales`` per group of
                 input rows; real = scale × (q − z).
``gguf-<type>``  a GGUF tensor of a ggml block type (Q4_0, Q4_1, Q8_0, K-quants, …): dequantized by the gguf
                 package (see layerscope.checkpoint.ggufread).
``bnb-int8``     bitsandbytes LLM.int8: ``weight`` I8 (out, in) + ``SCB`` F32 (out,); real = q × SCB / 127.

Anything else that is clearly quantized (a ``quantization_config`` with another method, integer
or packed weights, bitsandbytes 4-bit state) is refused with an error naming the tensor and the
scheme, never skipped.
"""

from __future__ import annotations

import torch

from layerscope.checkpoint.dtypes import FLOATING
from layerscope.checkpoint.quantization.bnb import _bnb_int8, dequantize_bnb_int8
from layerscope.checkpoint.quantization.common import FP8, LogicalTensor, group_count, group_size_of
from layerscope.checkpoint.quantization.mxfp4 import ExpertStack, _mxfp4, dequantize_mxfp4
from layerscope.checkpoint.quantization.packed import (
    _ct_packed,
    _packed_int,
    dequantize_awq,
    dequantize_ct_packed,
    dequantize_gptq,
)
from layerscope.checkpoint.quantization.scaled import _fp8_block, _scaled, dequantize_fp8_block, dequantize_scaled
from layerscope.checkpoint.reader import Checkpoint, TensorInfo, read_tensor
from layerscope.errors import LayerscopeError
from layerscope.strictjson import strict_json

# Companions that only matter at inference (activation / KV-cache scales): dropped, never analysed.
INFERENCE_ONLY = (".input_scale", ".output_scale", ".k_scale", ".v_scale", ".input_global_scale",
                  ".weight_format", ".kv_scale", ".q_scale", ".prob_scale")


# Suffixes that belong to formats layerscope recognises but cannot decode.
REFUSED_SUFFIXES = {
    ".weight_global_scale": "compressed-tensors nvfp4",
    ".weight.absmax": "bitsandbytes 4-bit (nf4/fp4)",
    ".weight.quant_map": "bitsandbytes 4-bit (nf4/fp4)",
    ".weight.nested_absmax": "bitsandbytes 4-bit (nf4/fp4)",
    ".weight.nested_quant_map": "bitsandbytes 4-bit (nf4/fp4)",
}


KNOWN_METHODS = frozenset({"fp8", "compressed-tensors", "gptq", "awq", "bitsandbytes", "mxfp4", "fbgemm_fp8"})


def quantization_config(ckpt: Checkpoint) -> dict:
    """``quantization_config`` from config.json, or AutoGPTQ's / AutoAWQ's side files."""
    config = ckpt.config.get("quantization_config")
    if isinstance(config, dict):
        return config
    if not ckpt.files:  # a model in memory has no folder to hold side files
        return {}
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    for side, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        path = folder / side
        if path.is_file():
            loaded = strict_json(path.read_bytes(), str(path))
            if isinstance(loaded, dict):
                return {"quant_method": loaded.get("quant_method", method), **loaded}
    return {}


def logical_tensors(ckpt: Checkpoint) -> list[LogicalTensor]:
    """Every tensor of the checkpoint, with quantized weights and their companions merged into one."""
    qconfig = quantization_config(ckpt)
    method = str(qconfig.get("quant_method", "")).lower() or None
    tensors = ckpt.tensors
    for info in tensors.values():  # a format we cannot decode fails before anything else is looked at
        _refuse_unknown_suffix(info)
    consumed: set[str] = set()
    out: list[LogicalTensor] = []
    for name, info in tensors.items():
        if name in consumed:
            continue
        logical = _recognise(name, info, tensors, qconfig, method)
        if logical is None:
            if _is_inference_only(name):
                continue
            _refuse_unrecognised(info, method)
            logical = LogicalTensor(name, info.shape, info.dtype, {"weight": info})
        consumed.update(part.name for part in logical.parts.values())
        out.append(logical)
    return out


def _is_inference_only(name: str) -> bool:
    return any(name.endswith(suffix) for suffix in INFERENCE_ONLY)


def _refuse_unknown_suffix(info: TensorInfo) -> None:
    for suffix, scheme in REFUSED_SUFFIXES.items():
        if info.name.endswith(suffix) or f"{suffix}." in info.name:
            raise LayerscopeError(f"{info.file}: tensor {info.name!r} is stored as {scheme}, which layerscope "
                                  "cannot dequantize (scan the unquantized checkpoint)")


def _refuse_unrecognised(info: TensorInfo, method: str | None) -> None:
    """A weight-like tensor that is not real-valued and belongs to no known format is an error."""
    weight_like = len(info.shape) >= 2 and info.name.endswith(("weight", "_proj", "qweight"))
    if not weight_like or info.dtype in FLOATING - FP8:
        return
    if info.dtype in FP8 and method is None:
        return  # plain FP8 values without a quantization scheme are real numbers
    scheme = f"quantization method {method!r}" if method else f"integer/packed dtype {info.dtype}"
    if method in KNOWN_METHODS:
        scheme += " (its scale/zero tensors are missing)"
    raise LayerscopeError(f"{info.file}: tensor {info.name!r} ({info.dtype}) is quantized with {scheme}, which "
                          "layerscope cannot dequantize; nothing was analysed")


def _recognise(name: str, info: TensorInfo, tensors: dict[str, TensorInfo], qconfig: dict,
               method: str | None) -> LogicalTensor | None:
    if info.container == "gguf" and info.dtype not in FLOATING:  # a ggml block type: one tensor, self-contained
        return LogicalTensor(name, info.shape, info.dtype, {"weight": info}, quantization=f"gguf-{info.dtype}")
    if name.endswith(".qweight"):
        return _packed_int(name.removesuffix(".qweight"), tensors, qconfig, method)
    if name.endswith(".weight_packed"):
        return _ct_packed(name.removesuffix(".weight_packed"), info, tensors, qconfig, method)
    if name.endswith("_blocks"):
        base = name.removesuffix("_blocks")
        scales = tensors.get(f"{base}_scales")
        if scales is not None:
            return _mxfp4(base, info, scales)
    if name.endswith(".weight"):
        base = name.removesuffix(".weight")
        if f"{base}.weight_scale_inv" in tensors:
            return _fp8_block(name, info, tensors[f"{base}.weight_scale_inv"], qconfig)
        if f"{base}.weight_scale" in tensors:
            return _scaled(name, info, tensors, qconfig)
        if f"{base}.SCB" in tensors:
            return _bnb_int8(name, info, tensors[f"{base}.SCB"])
    return None


def load_stack(ckpt: Checkpoint, tensor: LogicalTensor) -> torch.Tensor | ExpertStack:
    """A stack of experts as :func:`load_logical` gives it, except MXFP4 stacks, which stay packed and decode one
    expert at a time (:class:`ExpertStack`)."""
    if tensor.quantization == "mxfp4" and len(tensor.shape) == 3:
        return ExpertStack(read_tensor(tensor.parts["blocks"]), read_tensor(tensor.parts["scales"]))
    return load_logical(ckpt, tensor)


def load_logical(ckpt: Checkpoint, tensor: LogicalTensor) -> torch.Tensor:
    """The real-valued weight: stored tensor as is; GGUF blocks decoded to float32 (exact); other quantized
    formats dequantized to float64."""
    if tensor.quantization is None:
        return read_tensor(tensor.main)
    scheme = tensor.quantization
    if scheme.startswith("gguf-"):  # decoded in float32, as llama.cpp does: exact, and the Gram upcasts by chunks
        return read_tensor(tensor.main)
    parts = {role: read_tensor(info) for role, info in tensor.parts.items()}
    if "-block" in scheme:
        rows, cols = (int(b) for b in scheme.split("-block")[1].split("x"))
        return dequantize_fp8_block(parts["weight"], parts["scale_inv"], rows, cols)
    if scheme.startswith(("fp8-", "int8-")):
        return dequantize_scaled(parts["weight"], parts["scale"], parts.get("zero"),
                                 group_size_of(tensor.shape[1], group_count(parts["scale"]), quantization_config(ckpt)))
    if scheme.startswith("ct-int"):
        bits = int(scheme.split("-")[1].removeprefix("int"))
        return dequantize_ct_packed(parts["packed"], parts["scale"], parts.get("zero_point"), parts.get("g_idx"),
                                    bits, tensor.shape,
                                    group_size_of(tensor.shape[1], group_count(parts["scale"]), quantization_config(ckpt)))
    if scheme == "bnb-int8":
        return dequantize_bnb_int8(parts["weight"], parts["SCB"])
    if scheme == "mxfp4":
        return dequantize_mxfp4(parts["blocks"], parts["scales"]).mT
    bits = int(scheme.split("-")[1].removeprefix("int"))
    if scheme.startswith("gptq"):
        return dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), bits,
                               zero_offset=1 if scheme.endswith("v1") else 0)
    return dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"], bits)
