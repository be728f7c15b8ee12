"""A MoE model's expert MLPs in plans: transformers holds them as fused 3-D parameters, PEFT adapts them through
``target_parameters`` (one LoRA per expert), and the plan, its accounting, the PEFT export and ``--check-model``
say exactly what PEFT builds.  Tiny Qwen3-MoE (experts stored one by one, fused on load) and gpt-oss (stored
fused) models, built and saved by transformers; the user starts from the saved folder, as on the command line."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import layerscope  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402
from layerscope.export import export_plan  # noqa: E402
from layerscope.runtime import apply_plan  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=256, pad_token_id=0, max_position_embeddings=128)
MODELS = {"qwen3_moe": dict(num_experts=4, moe_intermediate_size=48, num_experts_per_tok=2),
          "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16)}
EVERY_ROLE = ["q", "k", "v", "o", "gate", "up", "down"]


def _build(model_type: str):
    config = transformers.AutoConfig.for_model(model_type, **TINY, **MODELS[model_type])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders = {}
    for model_type in MODELS:
        folder = tmp_path_factory.mktemp(model_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _build(model_type).save_pretrained(folder)
        folders[model_type] = folder
    return folders


def _cli(*args):
    return run_cli(*args)


def _expected_trainable(model, plan) -> int:
    """What PEFT should build, from the live model's own parameters: r·(in + out) per Linear, and per expert of
    each fused 3-D parameter E·r·(in + out) with (in, out) the expert matrix's sides."""
    total = 0
    for m in plan.modules():
        if "model_experts" in m:
            experts, a, b = model.get_parameter(m["name"]).shape
            assert experts == m["model_experts"] and {a, b} == {m["in_features"], m["out_features"]}
            total += experts * m["rank"] * (a + b)
        else:
            linear = model.get_submodule(m["name"])
            total += m["rank"] * (linear.in_features + linear.out_features)
    return total


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_the_cli_plans_the_expert_mlps_and_peft_builds_and_trains_exactly_that(model_type, saved, tmp_path):
    folder = saved[model_type]
    plan_file, config_file = tmp_path / "plan.json", tmp_path / "adapter_config.json"
    done = _cli("plan", str(folder), "--strategy", "adaptive-lora", "--mode", "linear-decay", "--base-rank", "8",
                "--min-rank", "2", "--target-roles", ",".join(EVERY_ROLE), "--out", str(plan_file), "-q")
    assert done.returncode == 0, done.stderr
    plan = layerscope.Plan.load(plan_file)
    fused = [m for m in plan.modules() if "model_experts" in m]
    assert sorted({m["role"] for m in fused}) == ["down", "gate_up"]
    assert {m["name"] for m in fused} == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                          for p in ("gate_up_proj", "down_proj")}
    assert sorted({m["rank"] for m in fused}) == [2, 8]  # per-layer ranks, which PEFT must honour per parameter
    assert plan.document["lora"]["dropout"] == 0.0  # PEFT trains fused expert parameters without dropout
    done = _cli("export", str(plan_file), "--format", "peft", "--check-model", str(folder), "--out", str(config_file))
    assert done.returncode == 0, done.stderr
    config = json.loads(config_file.read_text())
    assert config["target_parameters"] == sorted(m["name"] for m in fused)
    assert not any("experts" in name for name in config["target_modules"])

    model = _build(model_type)
    expected = _expected_trainable(model, plan)
    assert plan.accounting["trainable"]["total"] == expected
    options = {k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path")}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**options))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == expected
    built = {f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}.{module.parameter_name}":
             module.r["default"] for name, module in peft_model.named_modules() if hasattr(module, "parameter_name")}
    assert built == {m["name"]: m["rank"] for m in fused}  # (PEFT warns that these pattern keys matched nothing)

    for module in peft_model.modules():  # B starts at zero; give every adapter a value so a step moves the loss
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_expert_mlps_are_planned_only_when_asked_and_gate_goes_with_up(saved):
    folder = saved["qwen3_moe"]
    default = layerscope.plan(folder, "adaptive-lora", progress=False)
    assert not any("model_experts" in m for m in default.modules())
    assert default.document["lora"]["dropout"] == 0.05
    with pytest.raises(LayerscopeError, match=r"gate/up of the experts are one parameter in memory "
                                              r"\(model\.layers\.0\.mlp\.experts\.gate_up_proj\); name gate and up"):
        layerscope.plan(folder, "adaptive-lora", target_roles=["q", "gate", "down"], progress=False)
    down_only = layerscope.plan(folder, "uniform", rank=4, target_roles=["down"], progress=False)
    assert {m["name"] for m in down_only.modules()} == {"model.layers.0.mlp.experts.down_proj",
                                                        "model.layers.1.mlp.experts.down_proj"}
    assert down_only.accounting["trainable"]["total"] == 2 * 4 * 4 * (48 + 64)


def test_what_cannot_train_fused_experts_says_what_can(saved, tmp_path):
    folder = saved["qwen3_moe"]
    with pytest.raises(LayerscopeError, match="a mixture cannot wrap a 3-D expert parameter.*adaptive-lora"):
        layerscope.plan(folder, "alphalora", total_experts=8, target_roles=EVERY_ROLE, progress=False)
    done = _cli("plan", str(folder), "--strategy", "adaptive-lora", "--target-roles", ",".join(EVERY_ROLE),
                "--dropout", "0.1", "--out", str(tmp_path / "p.json"))
    assert done.returncode == 2 and "--dropout 0.1: PEFT adapts the model's fused expert MLPs without dropout" \
        in done.stderr and "Traceback" not in done.stderr and not (tmp_path / "p.json").exists()
    plan = layerscope.plan(folder, "adaptive-lora", target_roles=EVERY_ROLE, progress=False)
    with pytest.raises(LayerscopeError, match="--format mola cannot target the model's fused expert MLPs.*peft"):
        export_plan(plan, "mola")
    with pytest.raises(LayerscopeError, match="fused expert parameter, which layerscope.runtime does not wrap"):
        apply_plan(_build("qwen3_moe"), plan, verbose=False)
    table = export_plan(plan, "csv")
    assert "model_experts" in table.splitlines()[0]


def test_check_model_refuses_a_fused_parameter_the_model_lacks(saved):
    plan = layerscope.plan(saved["qwen3_moe"], "adaptive-lora", target_roles=EVERY_ROLE, progress=False)
    document = json.loads(plan.to_json())
    for layer in document["layers"]:
        for module in layer["modules"]:
            module["name"] = module["name"].replace("mlp.experts.down_proj", "mlp.experts.down")
    edited = layerscope.Plan(document, "edited")
    with pytest.raises(LayerscopeError, match=r"planned module model\.layers\.0\.mlp\.experts\.down is not in"):
        export_plan(edited, "peft", check_model=saved["qwen3_moe"])
    with pytest.raises(LayerscopeError, match=r"target_parameters entry 'model\.layers\.0\.mlp\.experts\.down' "
                                              r"matches 0 expert parameters"):
        export_plan(edited, "peft", check_model=saved["qwen3_moe"], allow_other_model=True)


def test_a_model_in_memory_plans_the_same_expert_parameters_as_its_folder(saved):
    model = _build("qwen3_moe")
    in_memory = layerscope.scan(model, estimators=("alpha_hill",), progress=False)
    from_folder = layerscope.scan(saved["qwen3_moe"], estimators=("alpha_hill",), progress=False)
    assert list(in_memory["name"]) == list(from_folder["name"])
    experts = from_folder[from_folder["kind"] == "expert"]
    assert set(experts["parameter"]) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                         for p in ("gate_up_proj", "down_proj")}
    assert list(in_memory["parameter"].fillna("")) == list(from_folder["parameter"].fillna(""))
    plans = [layerscope.plan(t, "alphalora", metric="alpha_hill", target_roles=["q", "v"], progress=False)
             for t in (in_memory, from_folder)]
    assert plans[0].layers == plans[1].layers
    by_table = layerscope.plan(from_folder, "adaptive-lora", target_roles=EVERY_ROLE, progress=False)
    by_headers = layerscope.plan(saved["qwen3_moe"], "adaptive-lora", target_roles=EVERY_ROLE, progress=False)
    assert [m["name"] for m in by_table.modules()] == [m["name"] for m in by_headers.modules()]
    assert by_table.accounting == by_headers.accounting
