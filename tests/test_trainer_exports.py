"""Trainer-aware exports: axolotl YAML, MoE-PEFT MixLoRA JSON, vLLM rank rounding, PEFT key check."""

from __future__ import annotations

import copy
import json
import re

import pytest

import layerscope
from layerscope.errors import LayerscopeError
from layerscope.export import export_plan
from layerscope.export.trainers import MOE_PEFT_TARGETS, checkpoint_module_names
from tests.builders import save_tiny_llama
from tests.cli_runner import run_cli  # noqa: E402

yaml = pytest.importorskip("yaml")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=3)


@pytest.fixture(scope="module")
def hilo(folder):
    return layerscope.plan(folder, "hilo", ranks=(2, 4, 6), experts=1, progress=False)


def test_axolotl_yaml_carries_every_rank_and_alpha(hilo, folder):
    document = yaml.safe_load(export_plan(hilo, "axolotl", check_model=folder))
    modules = hilo.modules()
    assert document["adapter"] == "lora" and document["lora_dropout"] == hilo.document["lora"]["dropout"]
    assert sorted(document["lora_target_modules"]) == sorted(m["name"] for m in modules)
    names = checkpoint_module_names(str(folder))
    for m in modules:
        keys = [k for k in document["lora_rank_pattern"] if re.match(rf"(.*\.)?({k})$", m["name"])]
        assert len(keys) == 1 and document["lora_rank_pattern"][keys[0]] == m["rank"]
        assert document["lora_alpha_pattern"][keys[0]] == m["lora_alpha"]
        assert sum(1 for n in names if re.match(rf"(.*\.)?({keys[0]})$", n)) == 1


def test_peft_key_check_catches_a_wrong_module_name(hilo, folder):
    document = copy.deepcopy(hilo.document)
    document["layers"][1]["modules"][0]["name"] = "model.layers.1.self_attn.qq_proj"
    broken = layerscope.Plan(document, source="broken.json")
    with pytest.raises(LayerscopeError, match="planned module model.layers.1.self_attn.qq_proj is not in"):
        export_plan(broken, "peft", check_model=folder)  # the model check names it first
    with pytest.raises(LayerscopeError, match=r"target_modules entry 'model\.layers\.1\.self_attn\.qq_proj' "
                                              r"matches 0 modules"):
        export_plan(broken, "peft", check_model=folder, allow_other_model=True)  # and the key check still does
    export_plan(hilo, "peft", check_model=folder)  # the real plan passes


def test_vllm_rounding_is_built_by_peft(hilo, folder, tmp_path):
    out = tmp_path / "peft.json"
    result = run_cli("export", str(_save(hilo, tmp_path)), "--format",
                             "peft", "--round-ranks", "vllm", "--out", str(out))
    assert result.returncode == 0, result.stderr
    before = sum(layerscope.export.to_table(hilo)["trainable"])
    assert f"trainable parameters {before:,} ->" in result.stderr and "rounded up" in result.stderr
    config = json.loads(out.read_text())
    assert set(config["rank_pattern"].values()) == {8}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    ranks = {name: module.r["default"] for name, module in wrapped.named_modules() if hasattr(module, "r")
             and isinstance(module.r, dict)}
    assert ranks and set(ranks.values()) == {8}
    after = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert f"-> {after:,}" in result.stderr


def _save(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    return path


def test_mixlora_for_uniform_ffn_mixtures(folder):
    plan = layerscope.plan(folder, "uniform", experts=4, rank=8, top_k=2, target_roles=["gate", "up", "down"],
                           progress=False)
    config = json.loads(export_plan(plan, "mixlora"))
    assert config["peft_type"] == "MIXLORA" and config["routing_strategy"] == "mixlora"
    assert (config["num_experts"], config["top_k"], config["r"], config["lora_alpha"]) == (4, 2, 8, 16)
    assert {k for k, v in config["target_modules"].items() if v} == {"gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == set(MOE_PEFT_TARGETS)


@pytest.mark.parametrize("strategy, params, reason", [
    ("hilo", dict(ranks=(2, 4, 6), experts=2), "one rank for the whole model"),
    ("uniform", dict(experts=4), "feed-forward block only"),
])
def test_mixlora_refuses_what_it_cannot_express(folder, strategy, params, reason):
    plan = layerscope.plan(folder, strategy, progress=False, **params)
    with pytest.raises(LayerscopeError, match=reason):
        export_plan(plan, "mixlora")
