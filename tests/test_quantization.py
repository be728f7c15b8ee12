"""Quantized and low-precision weights: each format written as its producer lays it out, dequantized by
layerscope, and compared with a reference dequantization written here independently (from the codes the
test itself chose, or from the bit fields), in float64 to 1e-9."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from layerscope.checkpoint.quantization import load_logical, logical_tensors
from layerscope.checkpoint.reader import open_checkpoint
from layerscope.errors import LayerscopeError
from layerscope.spectral.estimators import ESTIMATORS
from layerscope.spectral.scan import scan
from tests.builders import random_matrix
from tests.cli_runner import run_cli  # noqa: E402

OUT, IN = 160, 272  # not multiples of 128: partial FP8 blocks are exercised
Q_PROJ = "model.layers.0.self_attn.q_proj"


def _write(folder, tensors: dict[str, torch.Tensor], quantization_config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def _plain_rest() -> dict[str, torch.Tensor]:
    """The other projections of the block, unquantized, so the checkpoint is a real llama block."""
    return {f"model.layers.0.self_attn.{p}.weight": random_matrix(64, IN, seed=i)
            for i, p in enumerate(("k_proj", "v_proj"))}


def _check_spectrum(folder, reference: np.ndarray, label: str, name: str = f"{Q_PROJ}.weight"):
    """Scanned metrics and the dequantized weight's Gram spectrum equal the reference's, in float64."""
    ckpt = open_checkpoint(folder)
    logical = {t.name: t for t in logical_tensors(ckpt)}
    tensor = logical[name]
    assert tensor.quantization == label
    weight = load_logical(ckpt, tensor).numpy()
    np.testing.assert_allclose(weight, reference, rtol=0, atol=0)  # dequantization is exact in float64
    tall = reference if reference.shape[0] >= reference.shape[1] else reference.T
    expected = np.linalg.eigvalsh(tall.T @ tall)
    table = scan(folder, estimators=("alpha", "alpha_hill"), progress=False)
    row = table[table["tensor"] == name].iloc[0]
    assert row["quantization"] == label and row["status"] == "ok"
    assert row["lambda_max"] == pytest.approx(expected[-1], rel=1e-9)
    assert row["log_norm"] == pytest.approx(math.log10(expected.sum()), rel=1e-9)
    assert row["alpha_hill"] == pytest.approx(ESTIMATORS["alpha_hill"](np.clip(expected, 0, None)).alpha, rel=1e-9)
    companions = ("scale", "qzeros", "scales", "g_idx", "SCB", "_blocks")
    assert not any(part in t for t in table["tensor"] for part in companions), "a companion tensor was analysed"
    return table


# ---- FP8 ------------------------------------------------------------------------------------

def _fp8_block_quantize(w: torch.Tensor, block: int = 128):
    rows, cols = w.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    scale = torch.empty(grid, dtype=torch.float32)
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for bi in range(grid[0]):
        for bj in range(grid[1]):
            tile = w[bi * block:(bi + 1) * block, bj * block:(bj + 1) * block]
            s = float(tile.abs().max()) / 448.0
            scale[bi, bj] = s
            codes[bi * block:(bi + 1) * block, bj * block:(bj + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return codes, scale


def _fp8_block_reference(codes: torch.Tensor, scale: torch.Tensor, block: int = 128) -> np.ndarray:
    values = codes.to(torch.float64).numpy()
    out = np.empty_like(values)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rs, cs = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[rs, cs] = values[rs, cs] * float(scale[bi, bj])
    return out


def test_fp8_block_scaled_weights_are_dequantized(tmp_path):
    w = random_matrix(OUT, IN, seed=1) * 3
    codes, scale = _fp8_block_quantize(w)
    folder = _write(tmp_path / "fp8", {f"{Q_PROJ}.weight": codes, f"{Q_PROJ}.weight_scale_inv": scale,
                                       **_plain_rest()},
                    {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    table = _check_spectrum(folder, _fp8_block_reference(codes, scale), "fp8-block128x128")
    raw = table[table["tensor"] == f"{Q_PROJ}.weight"].iloc[0]
    codes_only = np.linalg.svd(codes.to(torch.float64).numpy(), compute_uv=False)[0] ** 2
    assert raw["lambda_max"] < codes_only / 1000  # the scale matters: raw codes are ~10^4-10^5 x larger


def test_fp8_block_scale_shape_mismatch_is_an_error(tmp_path):
    codes, scale = _fp8_block_quantize(random_matrix(OUT, IN, seed=1))
    folder = _write(tmp_path / "bad", {f"{Q_PROJ}.weight": codes, f"{Q_PROJ}.weight_scale_inv": scale[:, :1],
                                       **_plain_rest()}, {"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(LayerscopeError, match="weight_scale_inv.*does not match"):
        scan(folder, progress=False)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group", "int8"])
def test_compressed_tensors_fp8_scales(tmp_path, granularity):
    w = random_matrix(OUT, IN, seed=2)
    if granularity == "group":  # [out, in/16]: one scale per 16 input columns
        scale = w.reshape(OUT, IN // 16, 16).abs().amax(dim=2) / 448
        codes = (w.reshape(OUT, IN // 16, 16) / scale[..., None]).reshape(OUT, IN).to(torch.float8_e4m3fn)
        values = codes.to(torch.float64).numpy()
        reference = np.stack([values[:, c] * scale[:, c // 16].double().numpy() for c in range(IN)], axis=1)
    elif granularity == "int8":  # W8A8 int8, per output channel
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        codes = torch.round(w / scale).to(torch.int8)
        reference = codes.to(torch.float64).numpy() * scale.double().numpy()
    elif granularity == "tensor":
        scale = (w.abs().max() / 448).reshape(1)
        codes = (w / scale).to(torch.float8_e4m3fn)
        reference = codes.to(torch.float64).numpy() * float(scale[0])
    else:
        scale = (w.abs().amax(dim=1, keepdim=True) / 448)
        codes = (w / scale).to(torch.float8_e4m3fn)
        reference = codes.to(torch.float64).numpy() * scale.to(torch.float64).numpy()
    folder = _write(tmp_path / granularity, {f"{Q_PROJ}.weight": codes, f"{Q_PROJ}.weight_scale": scale,
                                             f"{Q_PROJ}.input_scale": torch.ones(1), **_plain_rest()},
                    {"quant_method": "compressed-tensors", "format": "float-quantized"})
    _check_spectrum(folder, reference, "int8-channel" if granularity == "int8" else f"fp8-{granularity}")


@pytest.mark.parametrize("bits", [4, 5])
def test_compressed_tensors_packed_with_group_index(tmp_path, bits):
    """pack-quantized int codes with activation-order groups (weight_g_idx) and packed zero points,
    packed here bit by bit into a Python integer per row (independent of the unpacking code)."""
    rng = np.random.default_rng(bits)
    group, groups = 16, IN // 16
    offset = 1 << (bits - 1)
    codes = rng.integers(-offset, offset, size=(OUT, IN))
    zeros = rng.integers(-offset, offset, size=(OUT, groups))
    scales = rng.uniform(1e-3, 1e-2, size=(OUT, groups)).astype(np.float32)
    g_idx = rng.permutation(IN) // group

    def pack_rows(values: np.ndarray) -> torch.Tensor:
        words = math.ceil(values.shape[1] * bits / 32)
        out = np.zeros((values.shape[0], words), dtype=np.int64)
        for r, row in enumerate(values):
            number = sum(int(v + offset) << (bits * i) for i, v in enumerate(row))
            out[r] = [(number >> (32 * k)) & 0xFFFFFFFF for k in range(words)]
        return torch.from_numpy(out.astype(np.uint32).view(np.int32))

    reference = np.empty((OUT, IN))
    for r in range(OUT):
        for c in range(IN):
            reference[r, c] = (codes[r, c] - zeros[r, g_idx[c]]) * np.float64(scales[r, g_idx[c]])
    tensors = {f"{Q_PROJ}.weight_packed": pack_rows(codes), f"{Q_PROJ}.weight_scale": torch.from_numpy(scales),
               f"{Q_PROJ}.weight_zero_point": pack_rows(zeros.T).T.contiguous(),
               f"{Q_PROJ}.weight_g_idx": torch.from_numpy(g_idx.astype(np.int32)),
               f"{Q_PROJ}.weight_shape": torch.tensor([OUT, IN]), **_plain_rest()}
    qconfig = {"quant_method": "compressed-tensors", "format": "pack-quantized",
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                   "num_bits": bits, "type": "int", "strategy": "group", "group_size": group, "symmetric": False}}}}
    _check_spectrum(_write(tmp_path / f"int{bits}", tensors, qconfig), reference, f"ct-int{bits}-group")


# ---- MXFP4 (gpt-oss) ------------------------------------------------------------------------

def _e2m1_from_bits(code: int) -> float:
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude


def test_mxfp4_blocks_and_scales(tmp_path):
    experts, out_f, in_f = 2, 48, 64
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (experts, out_f, in_f // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 130, (experts, out_f, in_f // 32), generator=gen, dtype=torch.uint8)
    decode = np.vectorize(_e2m1_from_bits)
    b = blocks.numpy().astype(np.int64)
    values = np.empty((experts, out_f, in_f // 32, 32))
    values[..., 0::2] = decode(b & 0xF)  # first element in the low nibble
    values[..., 1::2] = decode(b >> 4)
    values *= 2.0 ** (scales.numpy().astype(np.float64) - 127)[..., None]
    reference = values.reshape(experts, out_f, in_f)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    tensors = {f"{name}_blocks": blocks, f"{name}_scales": scales,
               "model.layers.0.mlp.router.weight": random_matrix(experts, 64, seed=4),
               "model.layers.0.self_attn.q_proj.weight": random_matrix(64, 64, seed=5)}
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "num_hidden_layers": 1,
                                                    "quantization_config": {"quant_method": "mxfp4"}}))
    save_file(tensors, str(folder / "model.safetensors"))
    ckpt = open_checkpoint(folder)
    tensor = next(t for t in logical_tensors(ckpt) if t.name == name)
    assert tensor.quantization == "mxfp4"
    got = load_logical(ckpt, tensor).numpy()
    np.testing.assert_array_equal(got, reference.transpose(0, 2, 1))  # gpt-oss bf16 layout: (E, in, out)
    table = scan(folder, estimators=("alpha_hill",), progress=False)
    experts_rows = table[table["kind"] == "expert"].sort_values("expert")
    assert list(experts_rows["expert"]) == [0, 1]
    for j, row in enumerate(experts_rows.itertuples()):
        eigs = np.linalg.eigvalsh(reference[j].T @ reference[j] if out_f >= in_f else reference[j] @ reference[j].T)
        assert row.lambda_max == pytest.approx(eigs[-1], rel=1e-9)
        assert (row.out_features, row.in_features) == (out_f, in_f)


# ---- GPTQ / AWQ -----------------------------------------------------------------------------

def _int4_quantize(w: np.ndarray, group: int, rows_of_group: np.ndarray):
    """Asymmetric 4-bit codes of W (out, in) per (group of input columns, output row)."""
    out_f, in_f = w.shape
    groups = in_f // group
    scales = np.empty((groups, out_f))
    zeros = np.empty((groups, out_f), dtype=np.int64)
    for g in range(groups):
        cols = w[:, rows_of_group == g]
        lo, hi = cols.min(axis=1), cols.max(axis=1)
        scales[g] = np.float16((hi - lo) / 15)
        zeros[g] = np.clip(np.round(-lo / scales[g]), 0, 15)
    codes = np.clip(np.round(w / scales[rows_of_group].T) + zeros[rows_of_group].T, 0, 15).astype(np.int64)
    return codes.T, scales.astype(np.float16), zeros  # codes as (in, out)


def _pack(values: np.ndarray, axis: int, order=tuple(range(8))) -> torch.Tensor:
    """Eight 4-bit values per int32 along ``axis``; nibble k holds element order[k] of each group of 8."""
    moved = np.moveaxis(values, axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], -1, 8)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint32)
    for k, element in enumerate(order):
        packed |= grouped[..., element].astype(np.uint32) << np.uint32(4 * k)
    return torch.from_numpy(np.moveaxis(packed, -1, axis).view(np.int32).copy())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_int4(tmp_path, act_order, checkpoint_format):
    out_f, in_f, group = 96, 128, 32
    w = random_matrix(out_f, in_f, seed=6).double().numpy()
    rng = np.random.default_rng(7)
    g_idx = rng.permutation(np.arange(in_f) // group) if act_order else np.arange(in_f) // group
    codes, scales, zeros = _int4_quantize(w, group, g_idx)
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros  # GPTQ v1 stores zero - 1
    tensors = {f"{Q_PROJ}.qweight": _pack(codes, axis=0), f"{Q_PROJ}.qzeros": _pack(stored_zeros & 0xF, axis=1),
               f"{Q_PROJ}.scales": torch.from_numpy(scales), **_plain_rest()}
    if act_order:
        tensors[f"{Q_PROJ}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
    reference = np.array([[float(scales[g_idx[i], o]) * (codes[i, o] - zeros[g_idx[i], o]) for i in range(in_f)]
                          for o in range(out_f)])
    folder = _write(tmp_path / "gptq", tensors, {"quant_method": "gptq", "bits": 4, "group_size": group,
                                                 "desc_act": act_order, "checkpoint_format": checkpoint_format})
    label = "gptq-int4-" + ("v1" if checkpoint_format == "gptq" else "v2")
    _check_spectrum(folder, reference, label)


def test_awq_int4(tmp_path):
    out_f, in_f, group = 96, 128, 32
    w = random_matrix(out_f, in_f, seed=8).double().numpy()
    g_of_row = np.arange(in_f) // group
    codes, scales, zeros = _int4_quantize(w, group, g_of_row)
    awq_order = (0, 2, 4, 6, 1, 3, 5, 7)
    tensors = {f"{Q_PROJ}.qweight": _pack(codes, axis=1, order=awq_order),
               f"{Q_PROJ}.qzeros": _pack(zeros, axis=1, order=awq_order),
               f"{Q_PROJ}.scales": torch.from_numpy(scales), **_plain_rest()}
    reference = np.array([[float(scales[g_of_row[i], o]) * (codes[i, o] - zeros[g_of_row[i], o])
                           for i in range(in_f)] for o in range(out_f)])
    folder = _write(tmp_path / "awq", tensors, {"quant_method": "awq", "bits": 4, "group_size": group,
                                                "version": "gemm", "zero_point": True})
    _check_spectrum(folder, reference, "awq-int4")


# ---- bitsandbytes ---------------------------------------------------------------------------

def test_bitsandbytes_int8(tmp_path):
    w = random_matrix(OUT, IN, seed=9)
    scb = w.abs().amax(dim=1)
    codes = torch.round(w * 127 / scb[:, None]).to(torch.int8)
    reference = np.array([[int(codes[o, i]) * float(scb[o]) / 127 for i in range(IN)] for o in range(OUT)])
    folder = _write(tmp_path / "bnb", {f"{Q_PROJ}.weight": codes, f"{Q_PROJ}.SCB": scb,
                                       f"{Q_PROJ}.weight_format": torch.zeros(1, dtype=torch.uint8), **_plain_rest()},
                    {"quant_method": "bitsandbytes", "load_in_8bit": True})
    _check_spectrum(folder, reference, "bnb-int8")


# ---- refusals -------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args)


REFUSED = {
    "unknown method": ({f"{Q_PROJ}.weight": torch.zeros(OUT, IN // 2, dtype=torch.uint8)},
                       {"quant_method": "hqq"}, "quantization method 'hqq'"),
    "int8 without scale": ({f"{Q_PROJ}.weight": torch.zeros(OUT, IN, dtype=torch.int8)}, None, "integer/packed"),
    "bnb 4-bit": ({f"{Q_PROJ}.weight": torch.zeros(OUT * IN // 2, 1, dtype=torch.uint8),
                   f"{Q_PROJ}.weight.absmax": torch.ones(8)}, {"quant_method": "bitsandbytes"}, "bitsandbytes 4-bit"),
    "qweight without config": ({f"{Q_PROJ}.qweight": torch.zeros(16, OUT, dtype=torch.int32),
                                f"{Q_PROJ}.qzeros": torch.zeros(1, OUT // 8, dtype=torch.int32),
                                f"{Q_PROJ}.scales": torch.ones(1, OUT, dtype=torch.float16)}, None, "quant_method gptq"),
    "packed compressed-tensors without weight_shape": (
        {f"{Q_PROJ}.weight_packed": torch.zeros(OUT, IN // 8, dtype=torch.int32),
         f"{Q_PROJ}.weight_scale": torch.ones(OUT, 1)}, {"quant_method": "compressed-tensors"}, "weight_shape"),
    "nvfp4": ({f"{Q_PROJ}.weight_packed": torch.zeros(OUT, IN // 2, dtype=torch.uint8),
               f"{Q_PROJ}.weight_scale": torch.ones(OUT, IN // 16, dtype=torch.float8_e4m3fn),
               f"{Q_PROJ}.weight_global_scale": torch.ones(1)}, {"quant_method": "compressed-tensors"}, "nvfp4"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unknown_or_unsupported_quantization_exits_2_and_writes_nothing(tmp_path, case):
    tensors, qconfig, message = REFUSED[case]
    folder = _write(tmp_path / "model", {**tensors, **_plain_rest()}, qconfig)
    out = tmp_path / "scan.csv"
    result = _cli("scan", str(folder), "--out", str(out), "--quiet")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and Q_PROJ in lines[0] and message in lines[0], result.stderr
    assert list(tmp_path.glob("scan*")) == []


def test_scan_with_no_layer_matrix_exits_2(tmp_path):
    folder = _write(tmp_path / "empty", {"model.embed_tokens.weight": random_matrix(64, 32, seed=1)})
    result = _cli("scan", str(folder), "--out", str(tmp_path / "s.csv"), "--quiet")
    assert result.returncode == 2 and "no projection or expert matrix" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("s*"))
