"""Scan orchestration: known spectra end to end, statuses, filters, precision policy, memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from layerscope.errors import LayerscopeError
from layerscope.spectral.estimators import alpha_hill, alpha_peak, alpha_ww
from layerscope.spectral.scan import scan
from tests.builders import matrix_with_spectrum, pareto_eigenvalues, random_matrix, write_checkpoint


def test_scan_recovers_planted_spectrum(tmp_path):
    eigs = pareto_eigenvalues(400, 3.0, seed=5)
    weight = matrix_with_spectrum(eigs, 600, seed=5)
    table = scan(write_checkpoint(tmp_path, {"layers.0.proj.weight": weight}), progress=False)
    row = table.iloc[0]
    exact = torch.as_tensor(eigs)
    assert (row.N, row.M, row.num_evals) == (600, 400, 400)
    assert row.lambda_max == pytest.approx(eigs[-1], rel=1e-9)
    assert row.alpha == pytest.approx(alpha_ww(exact).alpha, rel=1e-8)
    assert row.alpha_hill == pytest.approx(alpha_hill(exact).alpha, rel=1e-8)
    assert row.alpha_peak == pytest.approx(alpha_peak(exact).alpha, rel=1e-8)
    assert row.alpha_hill == pytest.approx(3.0, abs=4 * 2 / math.sqrt(200))
    assert row.log_norm == pytest.approx(math.log10(eigs.sum()), rel=1e-9)
    assert row.stable_rank == pytest.approx(eigs.sum() / eigs[-1], rel=1e-9)
    assert row.alpha_weighted == pytest.approx(row.alpha * math.log10(eigs[-1]), rel=1e-12)
    assert row.log_alpha_norm == pytest.approx(math.log10(np.sum(eigs ** row.alpha)), rel=1e-9)
    assert row.status == "ok" and row.precision == "f64"


def test_degenerate_matrices_get_status_and_nan_metrics(tmp_path):
    bad = random_matrix(32, 16, 1)
    bad[3, 4] = float("nan")
    tensors = {"layers.0.nan.weight": bad, "layers.0.zero.weight": torch.zeros(32, 16),
               "layers.0.thin.weight": random_matrix(32, 4, 2), "layers.0.fine.weight": random_matrix(32, 16, 3)}
    table = scan(write_checkpoint(tmp_path, tensors), progress=False).set_index("role")
    assert table.loc["nan", "status"] == "nonfinite_weights"
    assert table.loc["zero", "status"] == "zero_matrix"
    assert table.loc["thin", "status"] == "too_few_evals"
    for role in ("nan", "zero", "thin"):
        assert table.loc[role, ["alpha", "alpha_hill", "alpha_peak", "lambda_max", "log_norm"]].isna().all()
    assert table.loc["fine", "status"] == "ok" and np.isfinite(table.loc["fine", "alpha"])


def test_include_exclude_and_estimator_selection(tmp_path):
    tensors = {f"layers.{i}.{m}.weight": random_matrix(24, 16, 10 * i + j)
               for i in range(2) for j, m in enumerate(["a", "b"])}
    folder = write_checkpoint(tmp_path, tensors)
    assert list(scan(folder, include=r"\.a\.", progress=False).role) == ["a", "a"]
    assert list(scan(folder, exclude=r"layers\.0", progress=False).layer) == [1, 1]
    only_hill = scan(folder, estimators=("alpha_hill",), progress=False)
    assert "alpha" not in only_hill.columns and "alpha_weighted" not in only_hill.columns  # needs alpha
    with pytest.raises(LayerscopeError, match="--include"):
        scan(folder, include="(", progress=False)
    with pytest.raises(LayerscopeError, match="unknown"):
        scan(folder, estimators=("alpha_magic",), progress=False)


def test_batching_by_shape_does_not_change_results(tmp_path):
    tensors = {f"layers.{i}.p.weight": random_matrix(48, 32, i) for i in range(6)}
    folder = write_checkpoint(tmp_path, tensors)
    one_by_one = scan(folder, batch_bytes=1, progress=False)
    batched = scan(folder, batch_bytes=1 << 30, progress=False)
    cols = ["alpha", "alpha_hill", "alpha_peak", "lambda_max", "entropy"]
    np.testing.assert_allclose(one_by_one[cols].to_numpy(), batched[cols].to_numpy(), rtol=1e-10)


def test_f32_policy_keeps_f32_only_where_its_fit_is_trustworthy(tmp_path):
    # "wide": a spectrum spanning 12 decades whose power-law tail starts deep in the small
    # eigenvalues, where float32 Gram eigenvalues are noise -> the guard must recompute in f64.
    wide = np.logspace(-6, 6, 300)
    # "heavy": bulk near 1 and a heavy tail well above the float32 noise floor -> stays f32.
    heavy = np.concatenate([np.linspace(1, 2, 200), pareto_eigenvalues(100, 2.5, seed=3, xmin=2.0)])
    tensors = {"layers.0.wide.weight": matrix_with_spectrum(wide, 400, 1),
               "layers.0.heavy.weight": matrix_with_spectrum(heavy, 400, 2)}
    tensors = {k: v.float() for k, v in tensors.items()}  # real checkpoints are f32/bf16: exact in f32
    folder = write_checkpoint(tmp_path, tensors)
    f64 = scan(folder, precision="f64", progress=False).set_index("role")
    f32 = scan(folder, precision="f32", progress=False).set_index("role")
    assert f32.loc["wide", "precision"] == "f64 (f32 guard)"
    assert f32.loc["wide", "alpha"] == f64.loc["wide", "alpha"]
    assert f32.loc["heavy", "precision"] == "f32"
    for col in ("alpha", "alpha_hill", "alpha_peak"):
        assert f32.loc["heavy", col] == pytest.approx(f64.loc["heavy", col], rel=1e-5)
    # Without the guard the f32 eigenvalues at the bottom are visibly wrong:
    from layerscope.spectral.esd import gram_eigenvalues
    e32 = gram_eigenvalues(tensors["layers.0.wide.weight"][None], torch.float32)[0][0].double()
    e64 = gram_eigenvalues(tensors["layers.0.wide.weight"][None], torch.float64)[0][0]
    assert abs(float(e32[0] - e64[0])) / float(e64[0]) > 0.5



def test_auto_precision_is_exact_float64_on_cpu():
    from layerscope.spectral import esd
    cpu = torch.device("cpu")
    assert esd.working_dtype("auto", cpu) == torch.float64
    assert esd.working_dtype("f64", torch.device("cuda")) == torch.float64
    assert esd.working_dtype("f32", cpu) == torch.float32


@pytest.mark.parametrize("capability,expected", [
    ((9, 0), torch.float64), ((8, 0), torch.float64), ((7, 0), torch.float64), ((10, 0), torch.float64),  # H100/H200, A100, V100, B200
    ((8, 9), torch.float32), ((8, 6), torch.float32), ((12, 0), torch.float32), ((7, 5), torch.float32),  # L4/4090, A10, 5090, T4
])
def test_auto_precision_follows_the_gpus_fp64_rate(monkeypatch, capability, expected):
    from layerscope.spectral import esd

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert esd.working_dtype("auto", cuda) == expected
    assert esd.working_dtype("f64", cuda) == torch.float64 and esd.working_dtype("f32", cuda) == torch.float32


def test_bad_precision_is_rejected_before_any_reading(tmp_path):
    with pytest.raises(LayerscopeError, match="--precision 'f16'"):
        scan(tmp_path / "does-not-matter.safetensors", precision="f16", progress=False)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 300, 40), (2, 40, 300), (1, 1000, 64)])
def test_syrk_grams_equal_gemm_grams(stored, shape):
    from layerscope.spectral.esd import _grams_batched, _grams_syrk
    batch = torch.randn(*shape, dtype=torch.float64).to(stored)
    tall = batch.mT if shape[1] < shape[2] else batch
    for dtype in (torch.float64, torch.float32):
        # small chunks, so accumulation over several syrk calls is exercised
        lower = _grams_syrk(tall, dtype, chunk_bytes=4096)
        full = _grams_batched(tall, torch.float64, chunk_bytes=1 << 20)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(lower.double().tril(), full.tril(), rtol=tol, atol=tol * float(full.abs().max()))


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import layerscope
    def status_kb(field):  # VmHWM is this process's own peak (ru_maxrss can inherit the parent's)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    layerscope.scan(sys.argv[1], progress=False)  # warm-up: libraries, thread pools, allocator
    before = status_kb("VmHWM")
    table = layerscope.scan(sys.argv[2], progress=False)
    peak = status_kb("VmHWM")
    print(json.dumps({"before_kb": before, "peak_kb": peak, "rows": len(table)}))
""")


def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    rows, cols, count = 1536, 1024, 64  # 6 MiB float32 tensors, 384 MiB in all, 4 shards
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": random_matrix(rows, cols, i) for i in range(count)}
    big = write_checkpoint(tmp_path / "big", tensors, shards=4)
    small = write_checkpoint(tmp_path / "small", {"model.layers.0.mlp.up_proj.weight": random_matrix(rows, cols, 0)})
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(small), str(big)],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rows"] == count
    model_mib = rows * cols * 4 * count / 2**20
    growth_mib = (report["peak_kb"] - report["before_kb"]) / 1024
    # One batch (32 MiB budget on CPU) in float64 plus its Gram and one read buffer: far
    # below holding the model (384 MiB as stored, 768 MiB as float64).
    assert growth_mib < 0.5 * model_mib, report


def test_same_shape_different_dtypes_are_batched_apart(tmp_path):
    weight = random_matrix(32, 16, 7)
    tensors = {"layers.0.a.weight": weight, "layers.0.b.weight": weight.to(torch.bfloat16),
               "layers.0.c.weight": weight.to(torch.float16)}
    table = scan(write_checkpoint(tmp_path, tensors), batch_bytes=1 << 30, progress=False).set_index("role")
    assert list(table.dtype) == ["F32", "BF16", "F16"]
    assert (table.status == "ok").all()
    assert table.loc["b", "lambda_max"] == pytest.approx(table.loc["a", "lambda_max"], rel=1e-2)


def test_what_is_not_analysed_is_named_with_a_reason(tmp_path):
    from layerscope.spectral.columns import not_analysed
    from tests.builders import LLAMA_CONFIG, llama_tensors, random_matrix, write_checkpoint

    tensors = llama_tensors(layers=1, hidden=32, inter=48)
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    tensors[k], tensors[v] = random_matrix(4, 32, 1), torch.zeros(16, 32)
    # k and v have widths no head count gives: the config names no heads, so only the hidden size is checked
    config = {key: value for key, value in LLAMA_CONFIG.items() if "heads" not in key}
    folder = write_checkpoint(tmp_path / "m", tensors, config={**config, "num_hidden_layers": 1, "hidden_size": 32})
    table = scan(folder, progress=False)
    rows = table.set_index("name")
    assert rows.loc[k, "status"] == "too_few_evals" and "4 eigenvalues" in rows.loc[k, "note"]
    assert rows.loc[v, "status"] == "zero_matrix" and "zero" in rows.loc[v, "note"]
    assert not_analysed(table) == f"2 not analysable — too_few_evals: {k}; zero_matrix: {v}"


def test_a_slow_batch_at_the_head_does_not_idle_the_other_worker(tmp_path, monkeypatch):
    """While the first batch runs, the other worker goes on with the next ones; rows keep the file's order."""
    import importlib
    import threading
    import time

    scan_module = importlib.import_module("layerscope.spectral.scan")
    tensors = {f"layers.{i}.p.weight": random_matrix(48 + i, 32, i) for i in range(8)}  # eight shapes: eight batches
    folder = write_checkpoint(tmp_path, tensors)
    expected = scan(folder, threads=2, progress=False)
    first_done = threading.Event()
    finished_meanwhile = []
    analyse = scan_module.analyse_batch

    def slow_first(items, *args):
        rows = analyse(items, *args)
        if items[0].row["tensor"] == "layers.0.p.weight":
            time.sleep(1.0)
            first_done.set()
        elif not first_done.is_set():
            finished_meanwhile.append(items[0].row["tensor"])
        return rows

    monkeypatch.setattr(scan_module, "analyse_batch", slow_first)
    table = scan(folder, threads=2, batch_bytes=1, progress=False)
    assert len(finished_meanwhile) >= 5, finished_meanwhile  # waiting on the oldest let two through
    assert list(table["tensor"]) == list(expected["tensor"])
    np.testing.assert_allclose(table["alpha"].to_numpy(), expected["alpha"].to_numpy(), rtol=1e-12)
