"""Planner: strategies on hand-computed cases, rounding, budgets, accounting, the plan document."""

from __future__ import annotations

import json

import numpy as np
import pytest

import layerscope
from layerscope.errors import LayerscopeError
from layerscope.planning import LoraSettings, Plan
from layerscope.planning.inputs import inputs_from_table
from layerscope.planning.rounding import largest_remainder, reference_rounding
from layerscope.planning.strategies import alphalora, depth_groups
from tests.planning_fixtures import llama2_7b_header_checkpoint, scan_table

MISTRAL_SHIPPED = [1, 3, 5, 4, 4, 5, 4, 4, 3, 3, 2, 2, 2, 2, 3, 4, 9, 4, 8, 7, 8, 7, 8, 7, 9, 8, 6, 10, 6, 7, 3, 2]


def plan_from(values, strategy="alphalora", **params):
    return layerscope.plan(scan_table(values), strategy, progress=False, **params)


# ---- rounding

def test_largest_remainder_hand_computed():
    # 2^2.5, 3^2.5, 4^2.5, 5^2.5 = 5.657, 15.588, 32, 55.902 → shares of 20: 1.037, 2.856, 5.864, 10.243
    weights = [v**2.5 for v in (2, 3, 4, 5)]
    assert largest_remainder(weights, 20) == [1, 3, 6, 10]
    assert largest_remainder([1, 1, 1, 10**2.5], 4, minimum=1) == [1, 1, 1, 1]
    assert largest_remainder([1, 2, 100], 12, minimum=2, maximum=6) == [2, 4, 6]
    with pytest.raises(LayerscopeError, match="cannot split 3 over 6 layers"):
        largest_remainder([1] * 6, 3, minimum=1)


def test_reference_rounding_reproduces_its_quirks():
    assert reference_rounding([2, 3, 4, 5], 20, 2.5) == [1, 3, 6, 10]
    # np.round sends the three small layers to 0 experts (the sound default keeps 1 each)
    assert reference_rounding([1, 1, 1, 10], 4, 2.5) == [0, 0, 0, 4]
    # banker's rounding of 0.5 gives all zeros; the fix-up compares raw values**beta with the
    # counts, so every added expert lands on the first layer
    assert reference_rounding([1] * 6, 3, 1.0) == [3, 0, 0, 0, 0, 0]


def test_shipped_alphalora_mistral_list():
    assert sum(MISTRAL_SHIPPED) == 160
    # layer qualities whose alpha^2.5 shares are exactly the shipped counts
    values = [n ** (1 / 2.5) for n in MISTRAL_SHIPPED]
    for rounding in ("reference", "largest-remainder"):
        plan = plan_from(values, total_experts=160, beta=2.5, rounding=rounding)
        experts = [layer["experts"] for layer in plan.layers]
        assert experts == MISTRAL_SHIPPED and sum(experts) == 160
        assert [layer["top_k"] for layer in plan.layers] == [1 if e == 1 else 2 for e in experts]
    # higher alpha never gets fewer experts
    order = np.argsort(values, kind="stable")
    assert all(np.diff(np.asarray(experts)[order]) >= 0)


# ---- strategies

def test_alphalora_default_and_bounds():
    plan = plan_from([2, 3, 4, 5], total_experts=20)
    assert [layer["experts"] for layer in plan.layers] == [1, 3, 6, 10]
    assert [layer["metric"] for layer in plan.layers] == [2, 3, 4, 5]
    bounded = plan_from([2, 3, 4, 5], total_experts=20, max_experts=7, min_experts=2)
    assert [layer["experts"] for layer in bounded.layers] == [2, 4, 7, 7]
    reference = plan_from([1, 1, 1, 10], total_experts=4, rounding="reference")
    assert [layer["experts"] for layer in reference.layers] == [0, 0, 0, 4]  # documented: can give 0


def test_alphalora_uses_the_layer_mean_of_the_chosen_column():
    table = scan_table([2.0, 2.0])
    table.loc[(table.layer == 1) & (table.role == "q"), "alpha_peak"] = 9.0  # layer-1 mean = (6*2+9)/7 = 3
    result = alphalora(inputs_from_table(table), total_experts=10, beta=1.0)
    assert result.allocations[1].metric == pytest.approx(3.0)
    assert [a.experts for a in result.allocations] == [4, 6]


@pytest.mark.parametrize("shape,counts", [("▽", (2, 4, 6, 8)), ("increasing", (2, 4, 6, 8)),
                                          ("△", (8, 6, 4, 2)), ("⋈", (8, 2, 2, 8)), ("□", (5, 5, 5, 5))])
def test_mola_presets_on_32_layers(shape, counts):
    plan = plan_from([3.0] * 32, "mola", shape=shape)
    experts = [layer["experts"] for layer in plan.layers]
    assert experts == [c for c in counts for _ in range(8)]
    assert sum(experts) == 160
    assert {layer["top_k"] for layer in plan.layers} == {2}


def test_mola_any_depth():
    assert [len(g) for g in depth_groups(list(range(30)), 4)] == [8, 8, 7, 7]
    plan = plan_from([3.0] * 6, "mola", shape="▽")
    assert [layer["experts"] for layer in plan.layers] == [2, 2, 4, 4, 6, 8]
    with pytest.raises(LayerscopeError, match="--shape"):
        plan_from([3.0] * 6, "mola", shape="zigzag")


def test_hilo_depth_tiers_and_inverse_rank():
    plan = plan_from([3.0] * 32, "hilo")
    assert [layer["rank"] for layer in plan.layers] == [r for r in (2, 4, 6, 8) for _ in range(8)]
    assert {(layer["experts"], layer["top_k"]) for layer in plan.layers} == {(8, 2)}
    inverse = plan_from([3.0] * 8, "hilo", ranks=(2, 4, 8, 8), experts_mode="inverse-rank")
    experts = [layer["experts"] for layer in inverse.layers]
    assert experts[0] > experts[2] and experts[0] == experts[1] * 2 or experts[0] >= 2 * experts[2]
    budget = inverse.strategy["budget"]
    assert budget["used"] <= budget["params"]
    # same trainable parameters as uniform 8 experts at rank 8, to within one expert
    uniform = plan_from([3.0] * 8, "uniform", experts=8, rank=8)
    assert budget["params"] == uniform.accounting["trainable"]["total"]
    assert budget["slack"] < 2 * 64 * 8 * 7 + 7 * 128


def test_hilo_on_a_model_shallower_than_its_tiers_suggests_ranks_that_fit():
    with pytest.raises(LayerscopeError, match=r"4 rank tiers need at least 4 layers, and this model plans 3; give at "
                                              r"most 3 tiers, e.g. --ranks 2,6,8"):
        plan_from([3.0] * 3, "hilo")
    assert [layer["rank"] for layer in plan_from([3.0] * 3, "hilo", ranks=(2, 4, 8)).layers] == [2, 4, 8]


def test_hilo_ranks_from_activations_keep_the_budget(tmp_path):
    fractions = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]  # most near-zero → lowest rank
    path = tmp_path / "act.csv"
    rows = [{"layer": layer, "module": f"m{j}", "near_zero_fraction": f} for layer, f in enumerate(fractions)
            for j in range(3)]
    import pandas as pd
    pd.DataFrame(rows).to_csv(path, index=False)
    plan = plan_from([3.0] * 8, "hilo", rank_source="activations", activations=str(path))
    ranks = {layer["layer"]: layer["rank"] for layer in plan.layers}
    assert ranks == {1: 2, 3: 2, 5: 4, 7: 4, 6: 6, 4: 6, 2: 8, 0: 8}
    depth = plan_from([3.0] * 8, "hilo")
    assert plan.accounting["trainable"] == depth.accounting["trainable"]
    with pytest.raises(LayerscopeError, match="near_zero_fraction"):
        plan_from([3.0] * 8, "hilo", rank_source="activations")


def test_adaptive_lora_formulas_as_written():
    linear = plan_from([3.0] * 24, "adaptive-lora", mode="linear-decay", base_rank=16, min_rank=4)
    ranks = [layer["rank"] for layer in linear.layers]
    assert ranks == [max(4, int(16 - 12 * i / 23)) for i in range(24)]
    assert ranks[0] == 16 and ranks[-1] == 4 and np.mean(ranks) == pytest.approx(9.54, abs=0.01)  # seed: 9.5
    heavy = plan_from([3.0] * 4, "adaptive-lora", mode="attention-heavy", base_rank=16, min_rank=4)
    module_ranks = {m["role"]: m["rank"] for m in heavy.layers[0]["modules"]}
    assert module_ranks == {"q": 16, "k": 16, "v": 16, "o": 16, "gate": 8, "up": 8, "down": 8}
    empirical = plan_from([3.0] * 10, "adaptive-lora", mode="empirical", base_rank=10)
    assert [layer["rank"] for layer in empirical.layers] == [6, 6, 6, 12, 12, 12, 12, 10, 10, 10]
    assert {layer["experts"] for layer in linear.layers} == {1}


# ---- budgets

@pytest.mark.parametrize("strategy,params", [("alphalora", {}), ("mola", {}), ("hilo", {}),
                                             ("adaptive-lora", {}), ("uniform", {"experts": 1})])
def test_budget_is_met_without_exceeding_it(strategy, params):
    budget = 400_000  # ~3.8x one rank-8 LoRA on this 12-layer, hidden-64 table
    plan = plan_from(list(np.linspace(2, 5, 12)), strategy, budget_params=budget, **params)
    record = plan.strategy["budget"]
    assert record["used"] == plan.accounting["trainable"]["total"] <= budget
    assert record["slack"] == budget - record["used"]
    # maximal: not even the cheapest further unit fits in the slack
    in_out = 4 * (64 + 64) + 2 * (64 + 128) + (128 + 64)  # Σ (in + out) over a layer's 7 modules
    ins = 4 * 64 + 2 * 64 + 128  # Σ in: one router column per expert
    if strategy in ("hilo", "uniform"):  # the shape is the same count/rank everywhere: the next step is everywhere
        knob = {"hilo": "experts", "uniform": "rank"}[strategy]
        assert plan.strategy["params"][knob] == record["scale_value"]  # params say what the plan uses
        bigger = plan_from(list(np.linspace(2, 5, 12)), strategy, **{**params, knob: record["scale_value"] + 1})
        assert bigger.accounting["trainable"]["total"] > budget
        assert len({(layer["experts"], layer["rank"]) for layer in plan.layers}) == (1 if strategy == "uniform" else 4)
        return
    if record["unit"] == "experts":
        cheapest = min(layer["rank"] * in_out + ins * (2 if layer["experts"] == 1 else 1) for layer in plan.layers)
        assert plan.strategy["params"]["total_experts"] == sum(layer["experts"] for layer in plan.layers)
    else:
        cheapest = min(layer["experts"] * in_out for layer in plan.layers)
    assert 0 <= record["slack"] < cheapest


def test_budget_respects_matrix_sizes():
    plan = plan_from([3.0] * 2, "uniform", budget_params=10**6)  # below 8 full-rank experts per module (1.3M)
    assert {layer["rank"] for layer in plan.layers} == {64}  # rank cannot exceed min(in, out)
    assert plan.strategy["budget"]["slack"] > 0


def test_budget_ratio_and_impossible_budget():
    plan = plan_from([3.0] * 4, "uniform", budget_ratio=2.0)
    single = plan.accounting["baselines"]["single_lora"]["trainable"]
    assert plan.accounting["trainable"]["total"] == 2 * single
    assert {layer["rank"] for layer in plan.layers} == {16}
    with pytest.raises(LayerscopeError, match="cannot be met"):
        plan_from([3.0] * 4, "mola", budget_params=1000)
    with pytest.raises(LayerscopeError, match="not both"):
        plan_from([3.0] * 4, "uniform", budget_params=10, budget_ratio=1.0)


# ---- accounting on real Llama-2-7B shapes

def test_hilo_figures_on_llama2_7b_shapes(tmp_path):
    model = llama2_7b_header_checkpoint(tmp_path / "llama2-7b")
    plan = layerscope.plan(model, "hilo", ranks=(2, 4, 6, 8), experts=8, top_k=2, progress=False)
    ratios = plan.accounting["ratios"]
    assert ratios["trainable_adapters_vs_uniform_moe"] == pytest.approx(0.625, abs=1e-12)
    assert ratios["active_adapters_vs_single_lora"] == pytest.approx(1.25, abs=1e-12)
    assert ratios["active_adapters_vs_uniform_moe"] == pytest.approx(0.625, abs=1e-12)
    per_layer = 4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)  # Σ (in + out) of the 7 projections
    assert plan.accounting["baselines"]["single_lora"]["trainable"] == 8 * per_layer * 32
    assert plan.accounting["trainable"]["adapters"] == 8 * sum(r * per_layer * 8 for r in (2, 4, 6, 8))
    assert plan.accounting["trainable"]["routers"] == 32 * 8 * (4 * 4096 + 2 * 4096 + 11008)
    assert plan.model["num_layers"] == 32 and len(plan.modules()) == 224


# ---- the plan document

def test_plan_json_is_deterministic_and_round_trips(tmp_path):
    first = plan_from([2, 3, 4, 5], total_experts=20).to_json()
    second = plan_from([2, 3, 4, 5], total_experts=20).to_json()
    assert first == second
    saved = Plan.loads(first).save(tmp_path / "plan.json")
    assert saved.read_text() == first
    assert Plan.load(saved).document == json.loads(first)
    document = json.loads(first)
    assert document["schema"] == "layerscope.plan/1"
    assert document["model"]["fingerprint"] == "0" * 64
    assert document["strategy"]["params"]["beta"] == 2.5
    assert document["provenance"]["layerscope_version"] == layerscope.__version__


@pytest.mark.parametrize("path,value,message", [
    (("layers", 0, "experts"), -1, "$.layers[0].experts"),
    (("layers", 1, "modules", 0, "rank"), "eight", "$.layers[1].modules[0].rank"),
    (("model", "fingerprint"), "xyz", "$.model.fingerprint"),
    (("schema",), "layerscope.plan/0", "$.schema"),
    (("strategy", "name"), "magic", "$.strategy.name"),
])
def test_schema_rejects_malformed_plans_naming_the_path(path, value, message):
    document = json.loads(plan_from([2, 3, 4, 5], total_experts=20).to_json())
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(LayerscopeError) as info:
        Plan.loads(json.dumps(document), "bad.json")
    assert message in str(info.value) and "bad.json" in str(info.value)


def test_semantic_checks_beyond_the_schema():
    document = json.loads(plan_from([2, 3, 4, 5], total_experts=20).to_json())
    document["layers"][2]["experts"] += 1
    with pytest.raises(LayerscopeError, match=r"\$.accounting.trainable"):
        Plan.loads(json.dumps(document))
    document = json.loads(plan_from([2, 3, 4, 5], total_experts=20).to_json())
    document["layers"][0]["top_k"] = 5
    with pytest.raises(LayerscopeError, match=r"\$.layers\[0\].top_k"):
        Plan.loads(json.dumps(document))
    with pytest.raises(LayerscopeError, match="invalid JSON"):
        Plan.loads("{")


def test_plan_refuses_a_model_with_another_layer_count():
    plan = plan_from([2, 3, 4, 5], total_experts=20)
    plan.check_model(4, "0" * 64)
    with pytest.raises(LayerscopeError, match="plan is for 4 layers but model has 6"):
        plan.check_model(6)
    with pytest.raises(LayerscopeError, match="fingerprint"):
        plan.check_model(4, "1" * 64)


def test_lora_alpha_settings():
    fixed = plan_from([3.0] * 4, "hilo", ranks=(2, 4))
    assert {m["lora_alpha"] for m in fixed.modules()} == {16.0}
    scaled = layerscope.plan(scan_table([3.0] * 4), "hilo", ranks=(2, 4), lora=LoraSettings(alpha_scale=2.0),
                             progress=False)
    assert {(m["rank"], m["lora_alpha"]) for m in scaled.modules()} == {(2, 4.0), (4, 8.0)}


def test_a_budget_keeps_each_strategys_defining_shape():
    metric = list(np.linspace(2, 5, 12))
    budget = 500_000
    adaptive = plan_from(metric, "adaptive-lora", budget_params=budget)  # default cap 2 x base: the profile scales
    ranks = [layer["rank"] for layer in adaptive.layers]
    assert ranks[0] > ranks[-1] and len(set(ranks)) > 3  # still a decay, not the uniform plan
    assert adaptive.strategy["params"]["base_rank"] == adaptive.strategy["budget"]["scale_value"] > 16
    capped = plan_from(metric, "adaptive-lora", budget_params=budget, max_rank=32)  # an explicit cap binds
    capped_ranks = [layer["rank"] for layer in capped.layers]
    assert max(capped_ranks) <= 32 and capped_ranks[0] > capped_ranks[-1] and len(set(capped_ranks)) > 3
    assert capped.strategy["budget"]["slack"] > 0  # stops below the cap rather than flattening the decay
    hilo = plan_from(metric, "hilo", budget_params=budget)
    assert len({layer["experts"] for layer in hilo.layers}) == 1  # 8,7,7,7,6,6 would not be HILO's fixed experts
    assert sorted({layer["rank"] for layer in hilo.layers}) == [2, 4, 6, 8]
    alphalora = plan_from(metric, "alphalora", budget_params=budget)
    assert alphalora.strategy["params"]["total_experts"] == sum(layer["experts"] for layer in alphalora.layers)
