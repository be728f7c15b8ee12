"""Plots carry the expected panels and labels, the fitted line is the reported fit; the report renders."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from layerscope.spectral.estimators import alpha_hill, alpha_ww
from layerscope.viz import (
    build_report,
    plot_allocations,
    plot_alphas_by_layer,
    plot_esd,
    plot_near_zero,
    plot_norms_by_layer,
)
from layerscope.viz.browser import find_chromium, screenshot
from tests.builders import matrix_with_spectrum, pareto_eigenvalues, write_checkpoint
from tests.planning_fixtures import scan_table


def test_esd_figure_panels_and_fitted_line():
    eigs = np.concatenate([np.linspace(0.5, 2, 300), pareto_eigenvalues(100, 2.5, seed=4, xmin=2.0)])
    fig = plot_esd(eigs, "layers.0.q")
    loglog, linlin, d_curve, a_curve = fig.axes
    assert loglog.get_xscale() == "log" and loglog.get_yscale() == "log"
    assert [ax.get_title() for ax in fig.axes] == ["log-log ESD", "lin-lin ESD", "D vs xmin", "α vs xmin"]
    assert d_curve.get_ylabel() == "KS distance D" and a_curve.get_xlabel() == "xmin"
    fit = alpha_ww(torch.as_tensor(np.sort(eigs)))
    hill = alpha_hill(torch.as_tensor(np.sort(eigs)))
    line = next(l for l in loglog.get_lines() if l.get_gid() == "powerlaw-fit")
    x, y = line.get_data()
    assert x[0] == pytest.approx(fit.xmin)  # drawn from xmin
    slope = (math.log(y[-1]) - math.log(y[0])) / (math.log(x[-1]) - math.log(x[0]))
    assert slope == pytest.approx(-fit.alpha, rel=1e-9)  # with the reported alpha
    xmin_marker = next(l for l in loglog.get_lines() if l.get_gid() == "xmin")
    assert xmin_marker.get_xdata()[0] == pytest.approx(fit.xmin)
    hill_marker = next(l for l in loglog.get_lines() if l.get_gid() == "xmin-hill")
    assert hill_marker.get_xdata()[0] == pytest.approx(hill.xmin)
    title = fig._suptitle.get_text()
    assert f"α={fit.alpha:.3f}" in title and f"α_hill={hill.alpha:.3f}" in title and "D=" in title and "λ_max=" in title
    assert len(d_curve.get_lines()[0].get_xdata()) == len(eigs) - 1


def _table():
    table = scan_table([2.5, 3.0, 3.5, 7.0], metric="alpha")
    table["alpha_hill"] = table["alpha"] * 0.8
    table["alpha_peak"] = table["alpha"] * 0.9
    table["alpha_weighted"], table["log_norm"], table["stable_rank"] = 1.0, 2.0, 3.0
    table["name"] = table["module"] + ".weight"
    return table


def test_model_level_plots_have_reference_lines_and_labels():
    fig = plot_alphas_by_layer(_table())
    assert [ax.get_title() for ax in fig.axes] == ["alpha (WeightWatcher)", "alpha_hill (TempBalance)",
                                                   "alpha_peak (AlphaLoRA)"]
    first = fig.axes[0]
    horizontal = sorted(l.get_ydata()[0] for l in first.get_lines() if len(set(l.get_ydata())) == 1
                        and l.get_label().startswith("_"))
    assert horizontal == [2.0, 6.0]
    mean_line = next(l for l in first.get_lines() if l.get_label() == "layer mean")
    assert list(mean_line.get_ydata()) == [2.5, 3.0, 3.5, 7.0]
    assert [ax.get_title() for ax in plot_norms_by_layer(_table()).axes] == [
        "alpha_weighted by layer", "log_norm by layer", "stable_rank by layer"]


def test_near_zero_and_allocation_plots():
    activations = pd.DataFrame([{"layer": l, "role": r, "kind": k, "near_zero_fraction": 0.1 * l}
                                for l in range(3) for r, k in (("q", "projection"), ("block", "block"))])
    fig = plot_near_zero(activations)
    assert fig.axes[0].get_ylabel() == "near_zero_fraction"
    assert {l.get_label() for l in fig.axes[0].get_lines()} == {"q", "block output"}
    import layerscope
    plans = {"mola": layerscope.plan(scan_table([3.0] * 8), "mola", progress=False),
             "hilo": layerscope.plan(scan_table([3.0] * 8), "hilo", progress=False)}
    fig = plot_allocations(plans)
    experts_ax, ranks_ax = fig.axes
    assert experts_ax.get_legend() is None  # the legend sits below the panels, never over the bars
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0].startswith("mola: trainable ") and "active" in labels[0]
    heights = [p.get_height() for p in experts_ax.patches[:8]]
    assert heights == [2, 2, 4, 4, 6, 6, 8, 8]
    assert [p.get_height() for p in ranks_ax.patches[8:]] == [2, 2, 4, 4, 6, 6, 8, 8]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import layerscope
    folder = tmp_path_factory.mktemp("model")
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": matrix_with_spectrum(
        np.concatenate([np.linspace(0.5, 2, 60), pareto_eigenvalues(20, 2.0 + i, seed=i, xmin=2.0)]), 96, i).float()
        for i in range(3)}
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(96, 80)
    write_checkpoint(folder, tensors, config={"model_type": "llama", "num_hidden_layers": 3})
    table = layerscope.scan(folder, progress=False)
    plans = {"uniform": layerscope.plan(table, "uniform", rank=4, progress=False),
             "mixture": layerscope.plan(table, "mola", pattern=(2, 4, 2), progress=False),
             "mor": layerscope.plan(table, "hilo", ranks=(2, 4, 6), expert_type="mor", progress=False)}
    out = tmp_path_factory.mktemp("report")
    return build_report(table, out, model_path=folder, plans=plans, title="test report")


def test_report_plan_sections_say_what_each_plan_exports_to(report):
    page = report.read_text()
    assert "None" not in page  # missing cells are empty
    assert "<div class='table'><table>" in page  # wide tables scroll in their box, not off the page
    mixture = page.split("<h3>mixture")[1].split("<h3>")[0]
    assert "mixture: MoLA export or layerscope.runtime" in mixture and "plan_mixture.mola.txt" in mixture
    assert "peft" not in mixture.split("</h3>")[1].lower()  # no PEFT refusal text repeated under every mixture
    mor = page.split("<h3>mor")[1].split("<h3>")[0]
    assert "(hilo, MoR experts: train with layerscope.runtime)" in mor and "export" not in mor.split("</h3>")[1]
    uniform = page.split("<h3>uniform")[1].split("<h3>")[0]
    import layerscope  # the ratios are stated against the baselines stored in the plan, not fixed numbers

    stored = layerscope.planning.Plan.load(report.parent / "plan_uniform.json").accounting["baselines"]
    moe, single = stored["uniform_moe"], stored["single_lora"]
    assert f"uniform {moe['experts']}×r{moe['rank']} adapters" in uniform
    assert f"one rank-{single['rank']} LoRA" in uniform
    assert "plan_uniform.peft.json" in uniform


def test_report_contents(report):
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>test report</title>" in page
    assert "zero_matrix" in page  # the degenerate matrix is listed in the warnings
    for link in ("img/alphas_by_layer.png", "scan.csv", "plan_uniform.json", "plan_uniform.peft.json"):
        assert link in page and (report.parent / link).exists()
    assert "http://" not in page and "https://" not in page  # self-contained: no remote resources
    assert pd.read_csv(report.parent / "warnings.csv").issue.tolist()[0] == "zero_matrix"


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    png = screenshot(report, tmp_path / "shot.png", width=1000, height=1400)
    from PIL import Image
    image = Image.open(png)
    assert image.size == (1000, 1400)
    pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # not a blank page: text and plots were drawn


def test_lines_stop_at_a_stack_boundary_and_each_stack_is_named():
    table = _table()  # layers 0-3
    table["stack"] = np.where(table["layer"] < 2, "language_model", "vision_tower")
    for fig in (plot_alphas_by_layer(table), plot_norms_by_layer(table)):
        ax = fig.axes[0]
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 1 and line.get_linestyle() == "-"
                 and min(line.get_xdata()) != max(line.get_xdata())]
        spans = {(min(line.get_xdata()), max(line.get_xdata())) for line in lines}
        assert spans <= {(0, 1), (2, 3)}, spans  # no line from layer 1 into layer 2
        assert {t.get_text() for t in ax.texts} == {"language model", "vision tower"}
    single = plot_alphas_by_layer(_table())
    assert not single.axes[0].texts


def test_compare_plot_names_the_models_and_scales_each_panel():
    from layerscope.viz.plots import plot_compare

    layers = pd.DataFrame({"layer": [0, 1, 2], "alpha_base": [3.0, 3.2, 3.1], "alpha_other": [3.3, 3.5, 3.0],
                           "alpha_hill_base": [10.0, 12.0, 11.0], "alpha_hill_other": [9.0, 13.0, 11.5]})
    fig = plot_compare(layers, ("SmolLM2-135M", "SmolLM2-135M-Q4_0"))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["SmolLM2-135M", "SmolLM2-135M-Q4_0"]
    first, second = fig.axes[:2]
    assert first.get_ylim() != second.get_ylim() and second.get_ylim()[1] > 13
    same = plot_compare(layers, ("model", "model"))
    assert [t.get_text() for t in same.legends[0].get_texts()] == ["model (base)", "model (other)"]


def test_depth_is_described_per_stack_when_there_are_towers():
    from layerscope.spectral.coverage import depth_description

    assert depth_description({"num_layers": 6, "stack_depths": [{"name": "layers", "depth": 6, "tower": False}]}) \
        == "6 layers"
    gemma3 = {"num_layers": 8, "stack_depths": [{"name": "language_model", "depth": 4, "tower": False},
                                                 {"name": "vision_tower", "depth": 4, "tower": True}]}
    assert depth_description(gemma3) == "8 blocks (language_model 4, vision_tower 4: tower)"


def test_report_progress_counts_every_figure_drawn_and_written(tmp_path, monkeypatch):
    """The report's bar (stderr) moves once per figure drawn and once per figure written, and ends full: the
    long part of a report (ESD figures, PNG rendering) is no longer silent."""
    import io

    import layerscope
    from layerscope.viz import report as report_module

    bars = []

    def visible_bar(*args, **kwargs):
        kwargs.update(disable=False, file=io.StringIO())
        bars.append(report_module_tqdm(*args, **kwargs))
        return bars[-1]

    report_module_tqdm = report_module.tqdm
    monkeypatch.setattr(report_module, "tqdm", visible_bar)
    folder = tmp_path / "model"
    write_checkpoint(folder, {f"model.layers.{i}.mlp.up_proj.weight": matrix_with_spectrum(
        pareto_eigenvalues(60, 2.5, seed=i, xmin=1.0), 80, i).float() for i in range(2)},
        config={"model_type": "llama", "num_hidden_layers": 2})
    table = layerscope.scan(folder, progress=False)
    plans = {"mixture": layerscope.plan(table, "mola", pattern=(2, 4), progress=False)}
    build_report(table, tmp_path / "report", model_path=folder, plans=plans, progress=True)
    figures = len(list((tmp_path / "report" / "img").glob("*.png")))
    assert figures == 5 and bars[0].total == 2 * figures and bars[0].n == bars[0].total
    assert "wrote allocations" in bars[0].fp.getvalue()
