"""The command line: outputs by suffix, the summary, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest

from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint, write_raw_safetensors
from tests.cli_runner import run_cli  # noqa: E402


def run(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("m"), llama_tensors(), shards=2, config=LLAMA_CONFIG)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_scan_writes_tables_by_suffix(model, tmp_path, suffix):
    out = tmp_path / f"scan{suffix}"
    result = run("scan", str(model), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    if suffix == ".json":
        document = json.loads(out.read_text())
        assert document["schema"] == "layerscope.scan/1"
        assert document["model"]["naming"] == "llama"
        assert len(document["matrices"]) == 16 and len(document["layers"]) == 2
    else:
        read = pd.read_csv if suffix == ".csv" else pd.read_parquet
        assert len(read(out)) == 16
        assert list(read(tmp_path / f"scan.layers{suffix}").layer) == [0, 1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_summary_on_stdout(model):
    result = run("scan", str(model), "--estimators", "alpha_hill")
    assert result.returncode == 0, result.stderr
    assert "naming=llama" in result.stdout and "alpha_hill" in result.stdout
    assert "16 matrices" in result.stdout


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_inputs_exit_2_with_one_line(tmp_path, model):
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(b"\x00")
    _assert_one_line_error(run("scan", str(truncated)), "t.safetensors", "truncated")
    bad = write_raw_safetensors(tmp_path / "b.safetensors",
                                {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(10))
    _assert_one_line_error(run("scan", str(bad)), "b.safetensors", "'w'")
    _assert_one_line_error(run("scan", str(tmp_path / "missing")), "missing", "no such file")
    _assert_one_line_error(run("scan", str(model), "--out", str(tmp_path / "x.xlsx")), "x.xlsx", "format")
    _assert_one_line_error(run("scan", str(model), "--include", "("), "--include")
    _assert_one_line_error(run("scan", str(model), "--estimators", "nope"), "estimators")
    _assert_one_line_error(run("scan", str(model), "--device", "cuda:7"), "--device")
    assert not (tmp_path / "x.xlsx").exists()


def test_unwritable_output_is_a_clean_error(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _assert_one_line_error(run("scan", str(model), "--out", str(blocker / "scan.csv"), "-q"), "file")
