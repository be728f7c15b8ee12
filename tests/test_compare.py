"""compare: a model against a copy with one matrix perturbed; only that matrix's rows change."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import layerscope
from layerscope.errors import LayerscopeError
from layerscope.spectral.compare import compare, compare_layers
from layerscope.spectral.scan import scan
from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint
from tests.cli_runner import run_cli

CHANGED = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    tensors = llama_tensors(layers=3, hidden=48, inter=64)
    config = {**LLAMA_CONFIG, "num_hidden_layers": 3, "hidden_size": 48}
    base = write_checkpoint(root / "base", tensors, config=config)
    gen = torch.Generator().manual_seed(7)
    noise = 0.05 * torch.randn(tensors[CHANGED].shape, generator=gen)
    other = write_checkpoint(root / "other", {**tensors, CHANGED: tensors[CHANGED] + noise}, shards=2, config=config)
    return base, other, noise


def test_only_the_perturbed_matrix_changes(pair):
    base, other, noise = pair
    table = compare(base, other, progress=False).set_index("name")
    unchanged = table.drop(index=CHANGED)
    assert (unchanged["diff_status"] == "zero_matrix").all()
    deltas = [c for c in table.columns if c.startswith("delta_")]
    assert (unchanged[deltas].fillna(0) == 0).all().all()
    row = table.loc[CHANGED]
    assert row["diff_status"] == "ok" and row["delta_alpha_hill"] != 0
    eigs = np.linalg.eigvalsh((noise.double().T @ noise.double()).numpy())  # the difference, formed here
    assert row["diff_lambda_max"] == pytest.approx(eigs[-1], rel=1e-6)  # weights stored in float32
    direct = scan(other, progress=False).set_index("name").loc[CHANGED]
    assert row["alpha_hill_other"] == direct["alpha_hill"]
    layers = compare_layers(table.reset_index())
    assert layers.set_index("layer")["changed_matrices"].to_dict() == {0: 0, 1: 1, 2: 0}
    change = table.attrs["summary"]  # WeightWatcher's model means of both models, and their change
    before, after = (layerscope.summary(scan(path, progress=False)) for path in (base, other))
    assert list(change) == list(before) and change["alpha"]["base"] == pytest.approx(before["alpha"], rel=1e-12)
    assert change["log_norm"]["change"] == pytest.approx(after["log_norm"] - before["log_norm"], rel=1e-9)
    assert change["log_norm"]["change"] != 0


def test_mismatched_layouts_are_refused(pair, tmp_path):
    base, _, _ = pair
    tensors = llama_tensors(layers=3, hidden=48, inter=80)
    different = write_checkpoint(tmp_path / "different", tensors, config={**LLAMA_CONFIG, "num_hidden_layers": 3,
                                                                          "hidden_size": 48})
    with pytest.raises(LayerscopeError, match="mlp.*is 48x80 but 48x64|is 80x48 but 64x48"):
        compare(base, different, progress=False)


def test_cli_writes_tables_and_the_before_after_plot(pair, tmp_path):
    base, other, _ = pair
    out, plot = tmp_path / "cmp.csv", tmp_path / "alpha.png"
    result = run_cli("compare", str(base), str(other), "--out", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "1 of 23 matrices changed" in result.stdout
    assert "model means (WeightWatcher's get_summary): log_norm " in result.stdout
    assert len(pd.read_csv(out)) == 23 and len(pd.read_csv(tmp_path / "cmp.layers.csv")) == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_the_comparison_panel(pair, tmp_path):
    base, other, _ = pair
    out = tmp_path / "cmp.json"
    assert run_cli("compare", str(base), str(other), "--out", str(out), "-q").returncode == 0
    report = tmp_path / "report"
    result = run_cli("report", str(base), "--out", str(report), "--compare", str(out), "-q")
    assert result.returncode == 0, result.stderr
    page = (report / "index.html").read_text()
    assert "Fine-tune comparison" in page and "1 of 23 matrices changed" in page
    assert (report / "img" / "compare_alphas.png").is_file()
