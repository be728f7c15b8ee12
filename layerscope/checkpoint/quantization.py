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
``bnb-int8``     bitsandbytes LLM.int8: ``weight`` I8 (out, in) + ``SCB`` F32 (out,); real = q × SCB / 127.

Anything else that is clearly quantized (a ``quantization_config`` with another method, integer
or packed weights, bitsandbytes 4-bit state) is refused with an error naming the tensor and the
scheme, never skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerscope.checkpoint.dtypes import E2M1_VALUES, FLOATING
from layerscope.checkpoint.reader import Checkpoint, TensorInfo, read_tensor
from layerscope.errors import LayerscopeError
from layerscope.strictjson import strict_json

FP8 = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a packed int holds output column AWQ_ORDER[k]
MXFP4_BLOCK = 32
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


@dataclass(frozen=True)
class LogicalTensor:
    """One weight as the model sees it: its name, real-valued shape and how it is stored."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # stored dtype of the codes (e.g. F8_E4M3, I32) or of the plain tensor
    parts: dict[str, TensorInfo] = field(default_factory=dict)
    quantization: str | None = None

    @property
    def file(self) -> Path:
        return next(iter(self.parts.values())).file

    @property
    def main(self) -> TensorInfo:
        return next(iter(self.parts.values()))

    @property
    def analysable_dtype(self) -> str:
        """The dtype classification should see: quantized weights decode to float64."""
        return "F64" if self.quantization else self.dtype


def quantization_config(ckpt: Checkpoint) -> dict:
    """``quantization_config`` from config.json, or AutoGPTQ's / AutoAWQ's side files."""
    config = ckpt.config.get("quantization_config")
    if isinstance(config, dict):
        return config
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


def _bad(info: TensorInfo, message: str) -> LayerscopeError:
    return LayerscopeError(f"{info.file}: tensor {info.name!r}: {message}")


def _fp8_block(name: str, weight: TensorInfo, scale: TensorInfo, qconfig: dict) -> LogicalTensor:
    if weight.dtype not in FP8:
        raise _bad(weight, f"has weight_scale_inv but dtype {weight.dtype}, not FP8")
    block = qconfig.get("weight_block_size") or [128, 128]
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise LayerscopeError(f"config.json: quantization_config.weight_block_size {block!r} is not [rows, cols]")
    if len(weight.shape) < 2:
        raise _bad(weight, "FP8 block-scaled weight must be at least 2-D")
    *lead, rows, cols = weight.shape
    expected = (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale.shape) != expected:
        raise _bad(scale, f"shape {list(scale.shape)} does not match {list(expected)} "
                          f"({block[0]}x{block[1]} blocks of weight {list(weight.shape)})")
    _need_float(scale)
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
        raise _bad(weight, f"has weight_scale but dtype {weight.dtype} (expected FP8 or I8 codes)")
    _need_float(scale)
    if len(weight.shape) != 2:
        raise _bad(weight, f"{kind} weight with weight_scale must be 2-D, got {list(weight.shape)}")
    parts = {"weight": weight, "scale": scale}
    block = _block_of(weight.shape, scale.shape, qconfig)
    if block is not None:
        _no_zero_point(tensors, base, f"{kind} block")
        return LogicalTensor(name, weight.shape, weight.dtype, {"weight": weight, "scale_inv": scale},
                             f"{kind}-block{block[0]}x{block[1]}")
    granularity = _granularity(scale, weight.shape)
    zero = tensors.get(f"{base}.weight_zero_point")
    if zero is not None:
        if tuple(zero.shape) != tuple(scale.shape) or zero.dtype in FLOATING - FP8:
            raise _bad(zero, f"zero point {zero.dtype} {list(zero.shape)} does not match scale {list(scale.shape)}")
        parts["zero"] = zero
    return LogicalTensor(name, weight.shape, weight.dtype, parts, f"{kind}-{granularity}")


def _granularity(scale: TensorInfo, weight_shape: tuple[int, ...]) -> str:
    rows, cols = weight_shape
    shape = tuple(scale.shape)
    if math.prod(shape) == 1:
        return "tensor"
    if shape in ((rows,), (rows, 1)):
        return "channel"
    if len(shape) == 2 and shape[0] == rows and 1 < shape[1] <= cols:
        return "group"
    raise _bad(scale, f"shape {list(shape)} fits no per-tensor, per-channel, per-group or block scale of weight "
                      f"{list(weight_shape)}")


def _config_weights(qconfig: dict) -> list[dict]:
    """The ``weights`` argument dicts of every compressed-tensors config group."""
    groups = qconfig.get("config_groups")
    if not isinstance(groups, dict):
        return []
    return [g["weights"] for g in groups.values() if isinstance(g, dict) and isinstance(g.get("weights"), dict)]


def _block_of(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], qconfig: dict) -> tuple[int, int] | None:
    """The (rows, cols) block of a 2-D block scale, from a config group's ``block_structure``."""
    rows, cols = weight_shape
    if len(scale_shape) != 2:
        return None
    for weights in _config_weights(qconfig):
        block = weights.get("block_structure")
        if (isinstance(block, list) and len(block) == 2 and all(_positive_int(b) for b in block)
                and scale_shape == (math.ceil(rows / block[0]), math.ceil(cols / block[1]))):
            return block[0], block[1]
    return None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _no_zero_point(tensors: dict[str, TensorInfo], base: str, what: str) -> None:
    zero = tensors.get(f"{base}.weight_zero_point")
    if zero is not None:
        raise _bad(zero, f"a zero point with {what} scales is not a format layerscope knows")


def _group_size(cols: int, groups: int, qconfig: dict) -> int:
    """Columns per group: the config's ``group_size`` when it fits the scale, else ⌈cols / groups⌉."""
    for weights in _config_weights(qconfig):
        size = weights.get("group_size")
        if _positive_int(size) and math.ceil(cols / size) == groups:
            return size
    return math.ceil(cols / groups)


def _ct_packed(base: str, packed: TensorInfo, tensors: dict[str, TensorInfo], qconfig: dict,
               method: str | None) -> LogicalTensor:
    if method != "compressed-tensors":
        raise _bad(packed, f"weight_packed needs quantization_config.quant_method compressed-tensors (found {method!r})")
    if packed.dtype != "I32":
        raise _bad(packed, f"packed {packed.dtype} codes (nvfp4/mxfp4 pack formats) cannot be dequantized by "
                           "layerscope; pack-quantized int codes are I32")
    if len(packed.shape) != 2:
        raise _bad(packed, f"pack-quantized weight must be 2-D, got {list(packed.shape)}")
    parts = {"packed": packed}
    for role in ("scale", "shape", "zero_point", "g_idx"):
        info = tensors.get(f"{base}.weight_{role}")
        if info is None and role in ("scale", "shape"):
            raise _bad(packed, f"pack-quantized weight has no {base}.weight_{role}")
        if info is not None:
            parts[role] = info
    _need_float(parts["scale"])
    shape_info = parts["shape"]
    if shape_info.dtype not in ("I64", "I32") or tuple(shape_info.shape) != (2,):
        raise _bad(shape_info, f"weight_shape must be 2 integers, got {shape_info.dtype} {list(shape_info.shape)}")
    rows, cols = (int(v) for v in read_tensor(shape_info).tolist())
    if rows != packed.shape[0] or cols < 1:
        raise _bad(shape_info, f"weight_shape [{rows}, {cols}] does not fit weight_packed {list(packed.shape)}")
    bits = _packed_bits(packed, cols, qconfig)
    scale = parts["scale"]
    granularity = _granularity(scale, (rows, cols))
    if "zero_point" in parts:
        zero = parts["zero_point"]
        groups = 1 if granularity in ("tensor", "channel") else scale.shape[1]
        expected = (math.ceil(rows * bits / 32), groups)
        if zero.dtype != "I32" or tuple(zero.shape) != expected:
            raise _bad(zero, f"packed zero point {zero.dtype} {list(zero.shape)} is not I32 {list(expected)}")
    if "g_idx" in parts and (tuple(parts["g_idx"].shape) != (cols,) or parts["g_idx"].dtype not in ("I32", "I64")):
        raise _bad(parts["g_idx"], f"weight_g_idx {parts['g_idx'].dtype} {list(parts['g_idx'].shape)} is not "
                                   f"an integer [{cols}]")
    del parts["shape"]
    return LogicalTensor(f"{base}.weight", (rows, cols), "I32", parts, f"ct-int{bits}-{granularity}")


def _packed_bits(packed: TensorInfo, cols: int, qconfig: dict) -> int:
    """Code width: the config's int num_bits whose dense packing of ``cols`` codes fills the stored words."""
    declared = {w.get("num_bits") for w in _config_weights(qconfig) if w.get("type", "int") == "int"}
    fitting = sorted(b for b in declared if _positive_int(b) and b <= 8 and math.ceil(cols * b / 32) == packed.shape[1])
    if len(fitting) != 1:
        raise _bad(packed, f"{packed.shape[1]} int32 words per row of {cols} codes fit "
                           f"{'no' if not fitting else 'more than one'} int num_bits of the config groups "
                           f"({sorted(b for b in declared if isinstance(b, int))})")
    return fitting[0]


def _bnb_int8(name: str, weight: TensorInfo, scb: TensorInfo) -> LogicalTensor:
    if weight.dtype != "I8" or len(weight.shape) != 2:
        raise _bad(weight, f"bitsandbytes int8 weight must be 2-D I8, got {weight.dtype} {list(weight.shape)}")
    if tuple(scb.shape) != (weight.shape[0],):
        raise _bad(scb, f"SCB shape {list(scb.shape)} is not [{weight.shape[0]}] (one absmax per output row)")
    _need_float(scb)
    return LogicalTensor(name, weight.shape, "I8", {"weight": weight, "SCB": scb}, "bnb-int8")


def _mxfp4(base: str, blocks: TensorInfo, scales: TensorInfo) -> LogicalTensor:
    if blocks.dtype != "U8" or scales.dtype != "U8":
        raise _bad(blocks, f"MXFP4 blocks and scales must be U8, got {blocks.dtype} and {scales.dtype}")
    if len(blocks.shape) < 3 or blocks.shape[-1] != MXFP4_BLOCK // 2 or tuple(scales.shape) != blocks.shape[:-1]:
        raise _bad(blocks, f"MXFP4 blocks {list(blocks.shape)} / scales {list(scales.shape)} are not (..., G, 16) "
                           "and (..., G)")
    *lead, groups, _ = blocks.shape
    # Read as (..., out, in); returned transposed to (..., in, out), the layout of gpt-oss's bf16 experts.
    shape = (*lead[:-1], groups * MXFP4_BLOCK, lead[-1])
    return LogicalTensor(base, tuple(shape), "U8", {"blocks": blocks, "scales": scales}, "mxfp4")


def _packed_int(base: str, tensors: dict[str, TensorInfo], qconfig: dict, method: str | None) -> LogicalTensor:
    qweight = tensors[f"{base}.qweight"]
    if method not in ("gptq", "awq"):
        raise _bad(qweight, f"packed qweight needs quantization_config.quant_method gptq or awq in config.json "
                            f"(found {method!r})")
    bits = qconfig.get("bits", qconfig.get("w_bit", 4))
    if bits not in (2, 4, 8):
        raise _bad(qweight, f"{method} with bits={bits!r} is not supported (2, 4 or 8)")
    if method == "awq" and bits != 4:
        raise _bad(qweight, f"AWQ with bits={bits!r} is not supported (AWQ packs 4-bit codes)")
    if method == "awq" and str(qconfig.get("version", "gemm")).lower() != "gemm":
        raise _bad(qweight, f"AWQ version {qconfig.get('version')!r} is not supported (GEMM packing only)")
    parts = {"qweight": qweight}
    for part in ("qzeros", "scales", "g_idx"):
        info = tensors.get(f"{base}.{part}")
        if info is None and part != "g_idx":
            raise _bad(qweight, f"{method} weight has no {base}.{part}")
        if info is not None:
            parts[part] = info
    if qweight.dtype != "I32" or parts["qzeros"].dtype != "I32":
        raise _bad(qweight, f"{method} qweight/qzeros must be I32")
    _need_float(parts["scales"])
    per_int = 32 // bits
    if method == "gptq":
        in_f, out_f = qweight.shape[0] * per_int, qweight.shape[1]
    else:
        in_f, out_f = qweight.shape[0], qweight.shape[1] * per_int
    groups = parts["scales"].shape[0] if len(parts["scales"].shape) == 2 else -1
    if tuple(parts["scales"].shape) != (groups, out_f) or tuple(parts["qzeros"].shape) != (groups, out_f // per_int):
        raise _bad(parts["scales"], f"scales {list(parts['scales'].shape)} / qzeros {list(parts['qzeros'].shape)} "
                                    f"do not fit a {out_f}x{in_f} {method} weight")
    if "g_idx" in parts and tuple(parts["g_idx"].shape) != (in_f,):
        raise _bad(parts["g_idx"], f"g_idx shape {list(parts['g_idx'].shape)} is not [{in_f}]")
    version = "v2" if str(qconfig.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else "v1"
    label = f"{method}-int{bits}" + (f"-{version}" if method == "gptq" else "")
    return LogicalTensor(f"{base}.weight", (out_f, in_f), "I32", parts, label)


def _need_float(info: TensorInfo) -> None:
    if info.dtype not in FLOATING:
        raise _bad(info, f"scale tensor has dtype {info.dtype}, expected a float dtype")


# ---- dequantization ---------------------------------------------------------------------------

def load_logical(ckpt: Checkpoint, tensor: LogicalTensor) -> torch.Tensor:
    """The real-valued weight: stored tensor as is, quantized ones dequantized to float64."""
    if tensor.quantization is None:
        return read_tensor(tensor.main)
    parts = {role: read_tensor(info) for role, info in tensor.parts.items()}
    scheme = tensor.quantization
    if "-block" in scheme:
        rows, cols = (int(b) for b in scheme.split("-block")[1].split("x"))
        return dequantize_fp8_block(parts["weight"], parts["scale_inv"], rows, cols)
    if scheme.startswith(("fp8-", "int8-")):
        return dequantize_scaled(parts["weight"], parts["scale"], parts.get("zero"),
                                 _group_size(tensor.shape[1], _groups(parts["scale"]), quantization_config(ckpt)))
    if scheme.startswith("ct-int"):
        bits = int(scheme.split("-")[1].removeprefix("int"))
        return dequantize_ct_packed(parts["packed"], parts["scale"], parts.get("zero_point"), parts.get("g_idx"),
                                    bits, tensor.shape,
                                    _group_size(tensor.shape[1], _groups(parts["scale"]), quantization_config(ckpt)))
    if scheme == "bnb-int8":
        return parts["weight"].to(torch.float64).mul_(parts["SCB"].to(torch.float64)[:, None]).div_(127)
    if scheme == "mxfp4":
        return dequantize_mxfp4(parts["blocks"], parts["scales"]).mT
    bits = int(scheme.split("-")[1].removeprefix("int"))
    if scheme.startswith("gptq"):
        return dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), bits,
                               zero_offset=1 if scheme.endswith("v1") else 0)
    return dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"], bits)


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


def _groups(scale: torch.Tensor) -> int:
    return scale.shape[1] if scale.dim() == 2 else 1


def _broadcast_scale(scale: torch.Tensor, rows: int, cols: int, group_size: int,
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
    group_size = group_size or math.ceil(cols / _groups(scale))
    out = weight.to(torch.float64)
    if zero is not None:
        out.sub_(_broadcast_scale(zero, rows, cols, group_size))
    return out.mul_(_broadcast_scale(scale, rows, cols, group_size))


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
        out.sub_(_broadcast_scale(zero, rows, cols, group_size, g_idx))
    return out.mul_(_broadcast_scale(scale, rows, cols, group_size, g_idx))


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.long)  # low nibble first
    values = lut[codes].flatten(-2)  # (..., G, 32)
    exponent = scales.to(torch.float64) - 127
    return (values * torch.exp2(exponent)[..., None]).flatten(-2)


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
