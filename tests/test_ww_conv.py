"""Convolution rows (kind ``conv``) against WeightWatcher 0.7.7 on the same small CNN, built here and saved as
safetensors: the pooled ESD (``pool``), one row per kernel position, ``conv2d_norm``, and the extra estimators;
with the places where WeightWatcher's numbers are pinned as it computes them (layerscope.spectral.conv)."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pandas as pd
import pytest

weightwatcher = pytest.importorskip("weightwatcher")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import layerscope  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402

FIT_COLUMNS = ["alpha", "xmin", "D", "num_pl_spikes", "num_evals", "lambda_max", "log_norm", "log_spectral_norm",
               "stable_rank", "entropy", "alpha_weighted", "log_alpha_norm"]
CONV2D = ["c1", "c2", "c3"]


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 32, 3)  # rf 9, tall 32 x 3 matrices
        self.c2 = torch.nn.Conv2d(32, 64, 5)  # rf 25
        self.c3 = torch.nn.Conv2d(64, 48, (3, 2))  # rf 6 and wide 48 x 64 matrices: WeightWatcher swaps N and M
        self.d1 = torch.nn.Conv1d(16, 40, 3)
        self.dw = torch.nn.Conv1d(16, 16, 4, groups=16)  # depthwise: no matrix
        self.fc = torch.nn.Linear(64, 10)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCNN()
    folder = tmp_path_factory.mktemp("cnn")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model, folder


def _analyze(model, **options) -> pd.DataFrame:
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return weightwatcher.WeightWatcher(model=model).analyze(min_evals=0, **options)


def _conv_rows(table: pd.DataFrame) -> pd.DataFrame:
    rows = table[table["kind"] == "conv"]
    return rows.assign(layer_name=rows["name"].str.split(".").str[0]).reset_index(drop=True)


def _assert_columns_equal(ours: pd.DataFrame, theirs: pd.DataFrame, columns: list[str]) -> None:
    assert len(ours) == len(theirs)
    for column in columns:
        np.testing.assert_allclose(ours[column].astype(float).to_numpy(), theirs[column].astype(float).to_numpy(),
                                   rtol=1e-9, err_msg=column)


def test_pooled_conv2d_rows_equal_weightwatcher(cnn, tmp_path):
    model, folder = cnn
    out = tmp_path / "scan.csv"
    result = run_cli("scan", str(folder), "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    ours = _conv_rows(pd.read_csv(out))
    theirs = _analyze(model, pool=True).reset_index(drop=True)
    _assert_columns_equal(ours[ours["layer_name"].isin(CONV2D)], theirs[theirs["name"].isin(CONV2D)], FIT_COLUMNS)
    c1 = ours.set_index("layer_name").loc["c1"]
    assert (c1["shape"], c1["N"], c1["M"], c1["rf"], c1["num_evals"]) == ("32x3x3x3", 32, 3, 9, 27)
    # WeightWatcher swaps N and M once per kernel position, so an even rf of wide matrices ends swapped
    c3_ww = theirs.set_index("name").loc["c3"]
    assert (c3_ww["N"], c3_ww["M"]) == (48, 64)
    assert tuple(ours.set_index("layer_name").loc["c3", ["N", "M", "num_evals"]]) == (64, 48, 288)


def test_the_model_in_memory_gives_the_folders_rows(cnn):
    model, folder = cnn
    from_folder = _conv_rows(layerscope.scan(folder, progress=False))
    in_memory = _conv_rows(layerscope.scan(model, progress=False))
    assert list(in_memory["name"]) == list(from_folder["name"]) == ["c1.weight", "c2.weight", "c3.weight", "d1.weight"]
    _assert_columns_equal(in_memory, from_folder, FIT_COLUMNS)


def test_rows_per_kernel_position_equal_weightwatchers_slices(cnn):
    model, folder = cnn
    ours = _conv_rows(layerscope.scan(folder, pool=False, progress=False))
    theirs = _analyze(model, pool=False).reset_index(drop=True)
    conv2d = ours[ours["layer_name"].isin(CONV2D)].reset_index(drop=True)
    assert len(conv2d) == 9 + 25 + 6
    assert list(conv2d["name"][:4]) == ["c1.weight[0,0]", "c1.weight[0,1]", "c1.weight[0,2]", "c1.weight[1,0]"]
    theirs = theirs[theirs["name"].isin(CONV2D)].reset_index(drop=True)
    fitted = conv2d["layer_name"] != "c1"  # c1's positions have 3 eigenvalues: no fit here, WeightWatcher fits them
    assert (conv2d.loc[~fitted, "status"] == "too_few_evals").all()
    _assert_columns_equal(conv2d[fitted], theirs[fitted], FIT_COLUMNS)


def test_conv2d_norm_off_equals_weightwatcher_and_only_scales(cnn):
    model, folder = cnn
    normed = _conv_rows(layerscope.scan(folder, progress=False)).set_index("layer_name")
    plain = _conv_rows(layerscope.scan(folder, conv2d_norm=False, progress=False)).set_index("layer_name")
    theirs = _analyze(model, pool=True, conv2d_norm=False).set_index("name")
    _assert_columns_equal(plain.loc[CONV2D], theirs.loc[CONV2D], FIT_COLUMNS)
    np.testing.assert_allclose(plain.loc[CONV2D, "lambda_max"], 2 * normed.loc[CONV2D, "lambda_max"], rtol=1e-12)
    np.testing.assert_allclose(plain.loc[CONV2D, "alpha"], normed.loc[CONV2D, "alpha"], rtol=1e-12)
    assert plain.loc["d1", "lambda_max"] == pytest.approx(normed.loc["d1", "lambda_max"], rel=1e-12)  # Conv1d: no norm


def test_extra_estimators_on_conv_rows(cnn):
    model, folder = cnn
    ours = _conv_rows(layerscope.scan(folder, estimators=("alpha", "mp", "rank", "detx"), progress=False))
    ours = ours.set_index("layer_name")
    theirs = _analyze(model, pool=True, mp_fit=True, detX=True).set_index("name")
    _assert_columns_equal(ours.loc[CONV2D], theirs.loc[CONV2D],
                          ["matrix_rank", "rank_loss", "weak_rank_loss", "sv_max", "detX_num", "detX_val",
                           "num_ERG_spikes", "ERG_gap", "W_scale"])
    # the MP fit takes Q = N/M: equal where WeightWatcher's N and M are not swapped (c1, c2)
    _assert_columns_equal(ours.loc[["c1", "c2"]], theirs.loc[["c1", "c2"]],
                          ["num_spikes", "sigma_mp", "mp_softrank", "bulk_max", "bulk_min"])
    # WeightWatcher's sv_min is the largest of the positions' smallest singular values; ours is the smallest
    for name in CONV2D:
        positions = getattr(model, name).weight.detach().double().permute(2, 3, 0, 1) * np.sqrt(0.5)
        minima = torch.linalg.svdvals(positions).amin(dim=-1)
        assert theirs.loc[name, "sv_min"] == pytest.approx(float(minima.max()), rel=1e-9)
        assert ours.loc[name, "sv_min"] == pytest.approx(float(minima.min()), rel=1e-9)


def test_conv1d_is_analysed_per_tap_and_depthwise_kernels_are_named(cnn):
    """WeightWatcher hands nn.Conv1d's 3-D weight to its SVD as it is and keeps 3 eigenvalues of d1; layerscope
    pools the 3 taps' 40 x 16 matrices: 48 eigenvalues, no conv2d_norm."""
    model, folder = cnn
    table = layerscope.scan(folder, progress=False)
    d1 = _conv_rows(table).set_index("layer_name").loc["d1"]
    taps = model.d1.weight.detach().double().permute(2, 0, 1)
    eigs = np.sort(torch.linalg.eigvalsh(taps.mT @ taps).flatten().numpy())
    assert (d1["N"], d1["M"], d1["rf"], d1["num_evals"]) == (40, 16, 3, 48)
    assert d1["lambda_max"] == pytest.approx(eigs[-1], rel=1e-9)
    assert d1["log_norm"] == pytest.approx(np.log10(eigs.sum()), rel=1e-9)
    assert _analyze(model, pool=True).set_index("name").loc["d1", "num_evals"] == 3
    skipped = {entry["tensor"]: entry["reason"] for entry in table.attrs["not_analysed"]}
    assert skipped == {"dw.weight": "depthwise convolution kernel (one input channel: no matrix)"}


def test_describe_and_min_evals_count_a_pooled_kernels_eigenvalues(cnn):
    _, folder = cnn
    described = layerscope.scan(folder, describe=True).set_index("name")
    assert tuple(described.loc["c2.weight", ["N", "M", "rf", "num_evals"]]) == (64, 32, 25, 800)
    kept = layerscope.scan(folder, min_evals=30, progress=False)
    assert "c1.weight" not in set(kept["name"]) and "c2.weight" in set(kept["name"])  # c1 pools 27 eigenvalues
    per_position = layerscope.scan(folder, min_evals=30, pool=False, describe=True)
    assert set(per_position["tensor"]) == {"c2.weight", "c3.weight"}  # 32 and 48 per position


def test_conv_rows_are_never_planned(cnn, tmp_path):
    _, folder = cnn
    table = layerscope.scan(folder, progress=False)
    assert layerscope.layer_summary(table).empty
    result = run_cli("plan", str(folder), "--strategy", "uniform", "--out", str(tmp_path / "plan.json"))
    assert result.returncode == 2 and "\n" not in result.stderr.strip(), result.stderr


def test_compare_gives_a_kernel_its_difference_row(cnn, tmp_path):
    model, folder = cnn
    shifted = {k: v.detach() + 0.01 for k, v in model.state_dict().items()}
    (tmp_path / "other").mkdir()
    save_file({k: v.contiguous() for k, v in shifted.items()}, str(tmp_path / "other" / "model.safetensors"))
    rows = layerscope.compare(folder, tmp_path / "other", progress=False).set_index("name")
    weight = model.c2.weight.detach().double()
    assert rows.loc["c2.weight", "relative_error"] == pytest.approx(0.01 * weight.numel() ** 0.5 / float(weight.norm()),
                                                                   rel=1e-5)  # float32 storage
    # ΔW is 0.01 everywhere: rank 1 at each of c2's 25 positions, so its pooled ESD has 25 nonzero eigenvalues
    assert rows.loc["c2.weight", "diff_lambda_max"] == pytest.approx(0.5 * 0.01**2 * 64 * 32, rel=1e-5)
