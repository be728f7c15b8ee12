"""Distributed scans: ``torchrun --nproc-per-node 2`` (gloo, CPU) against the single-process scan."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerscope.spectral.distributed import Group, matrix_cost
from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(),
                                reason="torchrun / torch.distributed not available")
CONFIG = {**LLAMA_CONFIG, "num_hidden_layers": 4, "hidden_size": 96}


def _run(*args: str, torchrun: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # both runs single-threaded: bitwise comparable
    launcher = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "layerscope"] if torchrun else [
        sys.executable, "-m", "layerscope"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("m"), llama_tensors(layers=4, hidden=96, inter=160), shards=2,
                            config=CONFIG)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_two_ranks_write_the_single_process_table_byte_for_byte(model, tmp_path, suffix):
    single = _run("scan", str(model), "--out", str(tmp_path / f"single{suffix}"), "--quiet", torchrun=False)
    assert single.returncode == 0, single.stderr
    multi = _run("scan", str(model), "--out", str(tmp_path / f"multi{suffix}"), "--quiet", torchrun=True)
    assert multi.returncode == 0, multi.stderr
    for name in (f"{{}}{suffix}", f"{{}}.layers{suffix}"):
        assert (tmp_path / name.format("multi")).read_bytes() == (tmp_path / name.format("single")).read_bytes()


def test_two_ranks_resume_from_the_cache(model, tmp_path):
    cache = tmp_path / "cache"
    first = _run("scan", str(model), "--out", str(tmp_path / "a.parquet"), "--cache", str(cache), torchrun=True)
    assert first.returncode == 0, first.stderr
    second = _run("scan", str(model), "--out", str(tmp_path / "b.parquet"), "--cache", str(cache), torchrun=True)
    assert second.returncode == 0 and ", 0 computed" in second.stdout, second.stdout + second.stderr
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_a_failing_rank_fails_the_run_with_its_one_line_error(model, tmp_path):
    """One GPTQ projection has a group index past its groups: only the rank that reads it fails."""
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    tensors = llama_tensors(layers=4, hidden=96, inter=160)
    name = "model.layers.3.self_attn.q_proj"
    del tensors[f"{name}.weight"]
    tensors.update({f"{name}.qweight": torch.zeros(12, 96, dtype=torch.int32),
                    f"{name}.qzeros": torch.zeros(3, 12, dtype=torch.int32),
                    f"{name}.scales": torch.ones(3, 96, dtype=torch.float16),
                    f"{name}.g_idx": torch.full((96,), 99, dtype=torch.int32)})
    shutil.rmtree(broken)
    write_checkpoint(broken, tensors, shards=2, config={**CONFIG, "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 32}})
    out = tmp_path / "out" / "scan.parquet"
    result = _run("scan", str(broken), "--out", str(out), "--quiet", torchrun=True)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: rank ") and "g_idx holds group 99" in ours[0], result.stderr
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_a_truncated_shard_fails_once_with_a_rank_prefix(model, tmp_path):
    """Every rank reads the headers, so every rank fails; the user sees one line, from rank 0."""
    broken = tmp_path / "truncated"
    shutil.copytree(model, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    result = _run("scan", str(broken), "--quiet", torchrun=True)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0: ") and shard.name in ours[0], result.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_loopback_write_the_single_process_table_byte_for_byte(model, tmp_path):
    """torchrun's multi-node path: a c10d rendezvous on 127.0.0.1, two agents (``--nnodes 2``), one rank each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", endpoint, "--rdzv-id", "layerscope-test", "-m", "layerscope",
                                "scan", str(model), "--out", str(tmp_path / "multi.parquet")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), outputs
    single = _run("scan", str(model), "--out", str(tmp_path / "single.parquet"), "--quiet", torchrun=False)
    assert single.returncode == 0, single.stderr
    for name in ("{}.parquet", "{}.layers.parquet"):
        assert (tmp_path / name.format("multi")).read_bytes() == (tmp_path / name.format("single")).read_bytes()
    printed = "".join(out for out, _ in outputs)  # rank 0's agent prints the summary, one line per rank
    assert printed.count("wrote ") == 2 and "rank 0: " in printed and "rank 1: " in printed
    shares = [line for line in printed.splitlines() if line.startswith("rank ")]
    assert sum(int(line.split()[2]) for line in shares) == 30 and all("peak memory" in line for line in shares)


def test_cost_balanced_shares_cover_every_tensor_once():
    costs = [matrix_cost(shape) for shape in [(4096, 4096)] * 4 + [(11008, 4096)] * 3 + [(8, 64, 32)] * 5]
    shares = [Group(rank, 3, rank, None).share(costs) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) / min(loads) < 1.5
