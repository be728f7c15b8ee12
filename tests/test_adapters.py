"""Adapter analysis: ΔW spectra from the factors against the explicitly formed s·B·A in float64.

PEFT builds the reference adapter itself (rank_pattern, alpha_pattern, rslora) and its modules'
own ``scaling`` is the reference for s; our MoE-LoRA and MoR adapters come from ``save_adapters``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import layerscope
from layerscope.adapters.updates import delta_eigenvalues
from layerscope.errors import LayerscopeError
from layerscope.runtime import apply_plan, save_adapters
from tests.builders import save_tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _nonzero_eigs(delta: torch.Tensor, r: int) -> np.ndarray:
    """The top-r eigenvalues of ΔWᵀΔW (of the smaller Gram), formed explicitly in float64."""
    tall = delta if delta.shape[0] >= delta.shape[1] else delta.T
    return np.linalg.eigvalsh((tall.T @ tall).numpy())[-r:]


def _randomise_B(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lambda" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1 + (1.0 if "lambda" in name else 0.0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("base"), layers=2)


@pytest.fixture(scope="module")
def peft_adapter(base_dir, tmp_path_factory):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 12, "layers.1.self_attn.q_proj": 4},
                             alpha_pattern={"v_proj": 5}, use_rslora=True)
    wrapped = peft.get_peft_model(model, config)
    _randomise_B(wrapped)
    folder = tmp_path_factory.mktemp("peft")
    wrapped.save_pretrained(folder)
    modules = {name.removeprefix("base_model.model."): module for name, module in wrapped.named_modules()
               if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})}
    return folder, modules, wrapped


def test_delta_eigenvalues_equal_the_explicit_product():
    gen = torch.Generator().manual_seed(3)
    A, B = torch.randn(6, 40, generator=gen), torch.randn(30, 6, generator=gen)
    explicit = _nonzero_eigs(0.7 * (B.double() @ A.double()), 6)
    np.testing.assert_allclose(delta_eigenvalues(A, B, 0.7), explicit, rtol=1e-9)


def test_peft_adapter_rows_equal_explicit_updates(peft_adapter):
    folder, modules, _ = peft_adapter
    table = layerscope.scan(folder, progress=False).set_index("name")
    assert set(table.index) == set(modules) and set(table["kind"]) == {"delta"}
    for name, module in modules.items():
        A = module.lora_A["default"].weight.detach().double()
        B = module.lora_B["default"].weight.detach().double()
        r = A.shape[0]
        row = table.loc[name]
        assert row["lora_rank"] == r and row["num_evals"] == r
        assert row["lora_scaling"] == pytest.approx(module.scaling["default"], rel=1e-12)  # PEFT's own s
        expected = _nonzero_eigs(module.scaling["default"] * (B @ A), r)
        assert row["lambda_max"] == pytest.approx(expected[-1], rel=1e-9)
        assert row["log_norm"] == pytest.approx(math.log10(expected.sum()), rel=1e-9)
        assert row["stable_rank"] == pytest.approx(expected.sum() / expected[-1], rel=1e-9)
        if r >= 8:
            assert row["status"] == "ok" and math.isfinite(row["alpha_hill"])
        else:
            assert row["status"] == "too_few_evals" and math.isnan(row["alpha"]) and "norm metrics only" in row["note"]
    assert table.loc["model.layers.0.mlp.down_proj", "lora_rank"] == 12
    assert table.loc["model.layers.1.self_attn.q_proj", "lora_rank"] == 4
    assert table.loc["model.layers.0.self_attn.v_proj", "lora_scaling"] == pytest.approx(5 / math.sqrt(8))


def test_peft_adapter_with_base_also_analyses_the_merged_weight(peft_adapter, base_dir):
    folder, modules, wrapped = peft_adapter
    table = layerscope.scan(folder, base=base_dir, progress=False)
    merged_rows = table[table["kind"] == "merged"].set_index("module")
    merged_model = wrapped.merge_and_unload()  # PEFT's own W + s·B·A
    for name in modules:
        weight = merged_model.get_submodule(name).weight.detach().double()
        eigs = _nonzero_eigs(weight, min(weight.shape))
        assert merged_rows.loc[name, "lambda_max"] == pytest.approx(eigs[-1], rel=1e-6)  # PEFT merges in float32
    summary = layerscope.layer_summary(table)  # each kind apart: ΔW's missing fits never blank W + ΔW's
    assert sorted(zip(summary["kind"], summary["layer"])) == [("delta", 0), ("delta", 1), ("merged", 0), ("merged", 1)]
    merged = summary[summary["kind"] == "merged"].set_index("layer")
    for layer in (0, 1):
        rows = merged_rows[merged_rows["layer"] == layer]
        assert merged.loc[layer, "lambda_max"] == pytest.approx(rows["lambda_max"].mean())
        assert merged.loc[layer, "alpha"] == pytest.approx(rows["alpha"].mean()) and merged["alpha"].notna().all()


def test_our_moe_adapters_are_analysed_per_expert(base_dir, tmp_path):
    for expert_type in ("lora", "mor"):
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
        plan = layerscope.plan(base_dir, "hilo", ranks=(8, 10), experts=3, expert_type=expert_type, progress=False)
        apply_plan(model, plan, verbose=False)
        _randomise_B(model)
        folder = save_adapters(model, tmp_path / expert_type)
        table = layerscope.scan(folder, progress=False)
        wrapped = model._layerscope["modules"]
        assert len(table) == 3 * len(wrapped) and set(table["expert"]) == {0, 1, 2}
        for name, module in wrapped.items():
            for j in range(3):
                if expert_type == "lora":
                    delta = module.lora_B[j].double() @ module.lora_A[j].double()
                else:
                    delta = (module.lambda_B[j].double()[:, None] * module.lora_B.double()) @ (
                        module.lambda_A[j].double()[:, None] * module.lora_A.double())
                delta = module.scaling * delta.detach()
                row = table[(table["module"] == name) & (table["expert"] == j)].iloc[0]
                expected = _nonzero_eigs(delta, module.rank)
                assert row["lambda_max"] == pytest.approx(expected[-1], rel=1e-9)
                assert row["log_norm"] == pytest.approx(math.log10(expected.sum()), rel=1e-9)


def test_adapter_errors_are_one_line(peft_adapter, tmp_path):
    folder, _, _ = peft_adapter
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in folder.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    config = json.loads((broken / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LayerscopeError, match="rank 12 in the weights but 8 in the config"):
        layerscope.scan(broken, progress=False)
    config["use_dora"] = True
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LayerscopeError, match="DoRA"):
        layerscope.scan(broken, progress=False)
