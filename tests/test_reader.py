"""Checkpoint reader: layouts, lazy reads, dtype upcast, and validation of malformed files."""

from __future__ import annotations

import json

import pytest
import torch

from layerscope.checkpoint.reader import natural_key, open_checkpoint
from layerscope.errors import LayerscopeError
from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint, write_raw_safetensors


def test_single_file_and_sharded_give_same_tensors_and_fingerprint(tmp_path):
    tensors = llama_tensors(layers=12)
    single = open_checkpoint(write_checkpoint(tmp_path / "single", tensors, config=LLAMA_CONFIG))
    sharded = open_checkpoint(write_checkpoint(tmp_path / "sharded", tensors, shards=3))
    assert single.names == sharded.names
    assert len(sharded.files) == 3
    assert single.fingerprint() == sharded.fingerprint()
    for name in tensors:
        assert torch.equal(sharded.load(name), tensors[name])
    assert single.num_layers == 2 and single.architecture == "LlamaForCausalLM"


def test_layer_order_is_numeric_not_lexicographic(tmp_path):
    ckpt = open_checkpoint(write_checkpoint(tmp_path, llama_tensors(layers=12)))
    layer_of = [int(n.split(".")[2]) for n in ckpt.names if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)
    assert natural_key("model.layers.9.x") < natural_key("model.layers.10.x")


def test_single_file_path_and_adapter_file(tmp_path):
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 16)}
    folder = tmp_path / "adapter"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    assert open_checkpoint(folder).names == list(tensors)
    assert open_checkpoint(folder / "adapter_model.safetensors").names == list(tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_low_precision_dtypes_upcast(tmp_path, dtype):
    value = torch.tensor([[0.5, -1.0], [2.0, 0.25]]).to(dtype)
    ckpt = open_checkpoint(write_checkpoint(tmp_path, {"w": value}))
    loaded = ckpt.load("w", torch.float32)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, value.float())


# ---- malformed files: each one a clear LayerscopeError naming the file/tensor ----

GOOD_HEADER = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def _expect(path, *fragments):
    with pytest.raises(LayerscopeError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    _expect(path, "model.safetensors", "truncated")


def test_header_length_beyond_eof(tmp_path):
    path = write_raw_safetensors(tmp_path / "model.safetensors", GOOD_HEADER, bytes(16), header_len=10_000)
    _expect(path, "model.safetensors", "header length 10000 runs past the end")


def test_header_length_over_cap(tmp_path):
    path = write_raw_safetensors(tmp_path / "model.safetensors", GOOD_HEADER, bytes(16), header_len=2**40)
    _expect(path, "exceeds")


def test_invalid_json_header(tmp_path):
    path = tmp_path / "model.safetensors"
    raw = b"{not json"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    _expect(path, "model.safetensors", "invalid JSON")


def test_offsets_out_of_range(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, bytes(8))
    _expect(path, "'w'", "past the end")


def test_overlapping_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, bytes(24))
    _expect(path, "'a'", "'b'", "overlap")


def test_dtype_times_shape_mismatch(tmp_path):
    header = {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 16]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, bytes(16))
    _expect(path, "'w'", "BF16", "needs 8")


def test_unknown_dtype_and_bad_shape(tmp_path):
    path = write_raw_safetensors(tmp_path / "a.safetensors", {"w": {"dtype": "F3", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    _expect(path, "field 'dtype'", "is not a safetensors dtype")
    path = write_raw_safetensors(tmp_path / "b.safetensors", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4))
    _expect(path, "shape")


def test_index_names_missing_shard(tmp_path):
    folder = write_checkpoint(tmp_path, llama_tensors(), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    _expect(folder, "model-00002-of-00002.safetensors", "missing")


def test_index_names_missing_tensor(tmp_path):
    folder = write_checkpoint(tmp_path, llama_tensors(), shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _expect(folder, "model.layers.7.mlp.up_proj.weight", "no shard holds it")


def test_index_invalid_json_and_empty_folder(tmp_path):
    folder = write_checkpoint(tmp_path / "m", llama_tensors(), shards=2)
    (folder / "model.safetensors.index.json").write_text("{")
    _expect(folder, "model.safetensors.index.json", "invalid JSON")
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "no checkpoint found")
    _expect(tmp_path / "nope", "no such file")
