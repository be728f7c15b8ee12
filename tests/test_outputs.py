"""Outputs as a set (all complete or the previous set intact), the umask, and resumable scans.

The kill tests run the real CLI in a subprocess and SIGKILL it: at named points of the write phase
(``LAYERSCOPE_TEST_KILL_AT``, where the process kills itself), and at several moments of a scan.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from layerscope.errors import LayerscopeError
from layerscope.outputs import settle
from layerscope.spectral.scan import layer_summary, scan
from layerscope.tables import read_scan, scan_outputs, write_scan
from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint


def _cli(*args: str, kill_at: str | None = None, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAYERSCOPE_TEST_KILL_AT": kill_at or ""}
    return subprocess.run([sys.executable, "-m", "layerscope", *args], capture_output=True, text=True, env=env,
                           **popen)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    old = write_checkpoint(root / "old", llama_tensors(layers=2), config=LLAMA_CONFIG)
    new = write_checkpoint(root / "new", llama_tensors(layers=4, hidden=160, inter=320), shards=3,
                           config={**LLAMA_CONFIG, "num_hidden_layers": 4, "hidden_size": 160})
    return old, new


def _contents(targets: list[Path]) -> list[bytes | None]:
    return [t.read_bytes() if t.exists() else None for t in targets]


def _complete_sets(models, folder: Path, suffix: str) -> tuple[list[bytes], list[bytes]]:
    """The bytes of the old and the new output sets, each written by an uninterrupted run elsewhere."""
    sets = []
    for model, name in zip(models, ("old", "new")):
        out = folder / name / f"scan{suffix}"
        assert _cli("scan", str(model), "--out", str(out), "--quiet").returncode == 0
        sets.append(_contents(scan_outputs(out)))
    return sets[0], sets[1]


@pytest.fixture(scope="module")
def csv_sets(models, tmp_path_factory):
    return _complete_sets(models, tmp_path_factory.mktemp("csv"), ".csv")


def _put(targets: list[Path], contents: list[bytes]) -> None:
    """Lay down a complete previous set."""
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    for target, content in zip(targets, contents):
        target.write_bytes(content)


KILL_POINTS = {  # where the process dies → which set must be there once the outputs are settled
    "written:scan.csv": "old", "written:scan.layers.csv": "old", "written:scan.model.json": "old",
    "committing": "new", "renamed-first": "new",
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_during_the_write_phase_leaves_a_complete_set(models, csv_sets, tmp_path, point):
    old_set, new_set = csv_sets
    out = tmp_path / "here" / "scan.csv"
    targets = scan_outputs(out)
    _put(targets, old_set)

    killed = _cli("scan", str(models[1]), "--out", str(out), "--quiet", kill_at=point)
    assert killed.returncode == -signal.SIGKILL
    for content, old, new in zip(_contents(targets), old_set, new_set):
        assert content in (old, new)  # no file is ever half-written
    read_scan(out)  # any later reader (or writer) settles the set first
    assert _contents(targets) == (old_set if KILL_POINTS[point] == "old" else new_set)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_sigkill_at_any_moment_of_a_scan(models, tmp_path):
    """Killed after a range of delays (start-up, scanning, writing): the settled outputs are always the
    complete previous set or the complete new one."""
    old_set, new_set = _complete_sets(models, tmp_path, ".parquet")
    out = tmp_path / "here" / "scan.parquet"
    targets = scan_outputs(out)
    outcomes = set()
    for delay in (0.3, 1.5, 2.5, 3.5, 5.0):
        _put(targets, old_set)
        process = subprocess.Popen([sys.executable, "-m", "layerscope", "scan", str(models[1]), "--out", str(out),
                                    "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        settle(targets)
        state = _contents(targets)
        assert state in (old_set, new_set), f"mixed or partial set after a kill at {delay} s"
        outcomes.add("old" if state == old_set else "new")
    assert "old" in outcomes  # the early kills did hit before the commit


def test_a_failure_while_writing_the_second_file_keeps_the_previous_set(models, tmp_path, monkeypatch):
    out = tmp_path / "scan.parquet"
    table = scan(models[0], progress=False)
    write_scan(table, layer_summary(table), out)
    before = _contents(scan_outputs(out))
    original = pd.DataFrame.to_parquet

    def fail_on_layers(self, path, *args, **kwargs):
        if "layers" in Path(path).name:
            raise OSError(28, "No space left on device")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fail_on_layers)
    with pytest.raises(LayerscopeError, match="scan.layers.parquet: cannot write it .No space left on device"):
        write_scan(scan(models[1], progress=False), layer_summary(table), out)
    assert _contents(scan_outputs(out)) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_command_writes_nothing(tmp_path):
    folder = write_checkpoint(tmp_path / "m", {"model.embed_tokens.weight": torch.randn(8, 4)})
    result = _cli("scan", str(folder), "--out", str(tmp_path / "out" / "scan.csv"))
    assert result.returncode == 2
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(models, tmp_path, umask, mode):
    table = scan(models[0], progress=False)
    previous = os.umask(umask)
    try:
        written = write_scan(table, layer_summary(table), tmp_path / "scan.csv")
    finally:
        os.umask(previous)
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(mode)] * 3


# ---- resumable scans -----------------------------------------------------------------------

def test_a_killed_cached_scan_resumes_and_gives_the_same_bytes(models, tmp_path):
    model = models[1]
    reference = tmp_path / "reference.parquet"
    assert _cli("scan", str(model), "--out", str(reference), "--quiet").returncode == 0
    cache, out = tmp_path / "cache", tmp_path / "resumed.parquet"
    killed = _cli("scan", str(model), "--out", str(out), "--cache", str(cache), "--quiet", kill_at="cache-stored:9")
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    resumed = _cli("scan", str(model), "--out", str(out), "--cache", str(cache))
    assert resumed.returncode == 0, resumed.stderr
    assert "9 tensors reused" in resumed.stdout
    for ours, theirs in zip(scan_outputs(out), scan_outputs(reference)):
        assert ours.read_bytes() == theirs.read_bytes()
    again = _cli("scan", str(model), "--out", str(out), "--cache", str(cache))
    assert ", 0 computed" in again.stdout


def test_the_cache_invalidates_only_what_changed(tmp_path):
    tensors = llama_tensors(layers=2)
    model = write_checkpoint(tmp_path / "m", tensors, shards=2, config=LLAMA_CONFIG)
    shards = sorted(model.glob("*.safetensors"))
    cache = tmp_path / "cache"
    first = scan(model, progress=False, cache=cache)
    assert first.attrs["cache"]["reused"] == 0
    total = first.attrs["cache"]["computed"]

    # Rewrite the second shard with other values for the same names and shapes.
    from safetensors.torch import load_file, save_file
    changed = {k: v * 3 for k, v in load_file(str(shards[1])).items()}
    save_file(changed, str(shards[1]), metadata={"format": "pt"})
    in_second = sum(1 for name in first["tensor"].unique() if name in changed)
    second = scan(model, progress=False, cache=cache)
    assert second.attrs["cache"] == {"folder": str(cache), "reused": total - in_second, "computed": in_second}
    uncached = scan(model, progress=False)
    pd.testing.assert_frame_equal(second, uncached)

    other_settings = scan(model, progress=False, cache=cache, estimators=("alpha_hill",))
    assert other_settings.attrs["cache"]["reused"] == 0
