"""Quantized checkpoints written by the libraries that own the formats, read back by those libraries.

compressed-tensors quantizes and packs a tiny Llama (every weight strategy it offers), bitsandbytes
writes LLM.int8 and NF4 through transformers.  The reference for each weight is what the producer's
own decompression gives (transformers + compressed-tensors ``dequantize=True``, bitsandbytes'
``int8_vectorwise_dequant``); ours, computed in float64 and rounded to float32, must equal it bit for
bit (both are one correctly rounded product of exactly representable numbers; bitsandbytes rounds
twice, so there the bound is 2 ulp).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from layerscope.checkpoint.quantization import load_logical, logical_tensors  # noqa: E402
from layerscope.checkpoint.reader import open_checkpoint  # noqa: E402
from layerscope.spectral.scan import scan  # noqa: E402

CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
LINEARS_PER_LAYER = 7


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG))


def _ours(folder) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {t.name: load_logical(ckpt, t) for t in logical_tensors(ckpt) if t.quantization}


def _assert_equal_to_reference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                               rtol: float = 0.0) -> None:
    assert len(ours) == CONFIG["num_hidden_layers"] * LINEARS_PER_LAYER
    for name, weight in ours.items():
        assert weight.dtype == torch.float64
        torch.testing.assert_close(weight.to(torch.float32), reference[name].to(torch.float32), rtol=rtol, atol=0,
                                   msg=name)


# ---- compressed-tensors ------------------------------------------------------------------------

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)

from tests.cli_runner import run_cli  # noqa: E402

GROUP = 16
STRATEGIES = {
    # name: (QuantizationArgs, forced compression format or None, expected quantization label)
    "fp8-tensor": (dict(num_bits=8, type="float", strategy="tensor"), None, "fp8-tensor"),
    "fp8-channel": (dict(num_bits=8, type="float", strategy="channel"), None, "fp8-channel"),
    "fp8-group": (dict(num_bits=8, type="float", strategy="group", group_size=GROUP), None, "fp8-group"),
    "fp8-block": (dict(num_bits=8, type="float", strategy="block", block_structure=[32, 32]), None,
                  "fp8-block32x32"),
    "int8-channel-naive": (dict(num_bits=8, type="int", strategy="channel"), "naive-quantized", "int8-channel"),
    "int8-channel-asym-naive": (dict(num_bits=8, type="int", strategy="channel", symmetric=False),
                                "naive-quantized", "int8-channel"),
    "int8-channel-packed": (dict(num_bits=8, type="int", strategy="channel"), None, "ct-int8-channel"),
    "int4-group": (dict(num_bits=4, type="int", strategy="group", group_size=GROUP), None, "ct-int4-group"),
    "int4-group-asym": (dict(num_bits=4, type="int", strategy="group", group_size=GROUP, symmetric=False), None,
                        "ct-int4-group"),
    "int3-group-asym": (dict(num_bits=3, type="int", strategy="group", group_size=GROUP, symmetric=False), None,
                        "ct-int3-group"),
    "int2-channel": (dict(num_bits=2, type="int", strategy="channel"), None, "ct-int2-channel"),
}


def _observe(module, args: QuantizationArgs) -> None:
    """Set scales (and zero points) the way a min-max observer would."""
    w = module.weight.detach().to(torch.float32)
    rows, cols = w.shape
    if args.strategy == "block":
        b0, b1 = args.block_structure
        low = high = None
        absmax = w.reshape(rows // b0, b0, cols // b1, b1).abs().amax(dim=(1, 3))
    else:
        if args.strategy == "group":
            grouped = w.reshape(rows, cols // GROUP, GROUP)
        elif args.strategy == "channel":
            grouped = w.reshape(rows, 1, cols)
        else:
            grouped = w.reshape(1, 1, -1)
        low, high = grouped.amin(-1), grouped.amax(-1)
        absmax = torch.maximum(low.abs(), high.abs())
    if args.type == "float":
        scale = absmax / 448.0
    elif args.symmetric:
        scale = absmax / (2 ** (args.num_bits - 1) - 1)
    else:
        scale = (high - low) / (2 ** args.num_bits - 1)
        zero = torch.round(-low / scale) - 2 ** (args.num_bits - 1)
        module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(module.weight_zero_point.dtype)
    module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)


def _write_compressed_tensors(folder, args_dict: dict, fmt: str | None) -> None:
    from safetensors.torch import save_file

    model = _tiny_llama()
    args = QuantizationArgs(**args_dict)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            _observe(module, args)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    compressor.update_config(folder)


def _decompressed_by_library(folder) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.CompressedTensorsConfig(dequantize=True), dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_compressed_tensors_weights_equal_the_library_decompression(tmp_path, strategy):
    args, fmt, label = STRATEGIES[strategy]
    folder = tmp_path / strategy
    _write_compressed_tensors(folder, args, fmt)
    _assert_equal_to_reference(_ours(folder), _decompressed_by_library(folder))
    table = scan(folder, progress=False)
    projections = table[table["kind"] == "projection"]
    assert set(projections["quantization"]) == {label}
    assert not table["name"].str.contains("weight_scale|weight_zero_point|weight_packed|weight_shape|g_idx").any()


def test_compressed_tensors_packed_bits_must_come_from_the_config(tmp_path):
    folder = tmp_path / "int4"
    _write_compressed_tensors(folder, STRATEGIES["int4-group"][0], None)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("scan", str(folder), "--out", str(tmp_path / "s.csv"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "weight_packed" in result.stderr and "num_bits" in result.stderr
    assert not (tmp_path / "s.csv").exists()


# ---- bitsandbytes ------------------------------------------------------------------------------

def _bnb_folders(tmp_path, **quantization) -> tuple:
    bnb = pytest.importorskip("bitsandbytes")
    plain = tmp_path / "plain"
    if not plain.exists():
        _tiny_llama().save_pretrained(plain)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        plain, quantization_config=transformers.BitsAndBytesConfig(**quantization), device_map="cpu")
    name = "-".join(f"{k}" for k in quantization)
    model.save_pretrained(tmp_path / name)
    return bnb, model, tmp_path / name


def test_bitsandbytes_int8_equals_the_library_dequantization(tmp_path):
    bnb, model, folder = _bnb_folders(tmp_path, load_in_8bit=True)
    reference = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            reference[f"{name}.weight"] = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    # bitsandbytes multiplies by float32(1/127) after a float32 product: two roundings, so up to 2 ulp
    # from our exactly rounded q × SCB / 127.
    _assert_equal_to_reference(_ours(folder), reference, rtol=2.5e-7)
    table = scan(folder, progress=False)
    assert set(table.loc[table["kind"] == "projection", "quantization"]) == {"bnb-int8"}


def test_bitsandbytes_nf4_is_refused_by_name(tmp_path):
    _, _, folder = _bnb_folders(tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4")
    result = run_cli("scan", str(folder), "--out", str(tmp_path / "s.csv"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bitsandbytes 4-bit" in result.stderr
