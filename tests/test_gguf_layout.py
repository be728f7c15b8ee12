"""GGUF layouts checked as llama.cpp checks them, before gguf's reader walks them: each damaged or contradictory
file is one line naming the file and the field, at once (no multi-second walks of a declared 2^31-item array)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from layerscope.checkpoint.gguflayout import read_layout  # noqa: E402
from layerscope.checkpoint.ggufread import read_gguf_table  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402

NAMES = ("blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_up.weight")


def _file(path: Path, types=("F16", "F16", "F32"), tokens: int = 5, extra_int: bool = False) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list([f"tok{i}" for i in range(tokens)])
    writer.add_token_types([1] * tokens)
    rng = np.random.default_rng(0)
    for name, kind in zip(NAMES, types):
        writer.add_tensor(name, rng.standard_normal((32, 64)).astype(np.float16 if kind == "F16" else np.float32))
    if extra_int:
        writer.add_tensor("blk.0.attn_q.weight", np.arange(64, dtype=np.int32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _info_offset(data: bytes, name: str) -> int:
    """Byte position right after a tensor's name in the table (then: n_dims u32, dims u64..., type u32, offset u64)."""
    return data.index(name.encode()) + len(name)


def _refused(tmp_path: Path, label: str, content: bytes, *expected: str) -> str:
    bad = tmp_path / f"{label}.gguf"
    bad.write_bytes(content)
    with pytest.raises(LayerscopeError) as info:
        read_gguf_table(bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message, message
    for part in expected:
        assert part in message, message
    return message


def test_the_table_equals_what_the_gguf_reader_reads(tmp_path):
    path = _file(tmp_path / "good.gguf", tokens=1000)
    entries, architecture = read_gguf_table(path)
    reader = gguf.GGUFReader(str(path))
    assert architecture == "llama"
    assert [(e.gguf_name, e.ggml_type, e.begin, e.end - e.begin) for e in entries] == [
        (t.name, t.tensor_type.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    layout = read_layout(path)
    assert layout.alignment == 32 and layout.version == 3 and layout.data_start % 32 == 0


def test_lengths_larger_than_the_file_are_refused(tmp_path):
    data = _file(tmp_path / "good.gguf").read_bytes()
    # token_type: item type (u32) then the item count (u64), right after the key
    key = b"tokenizer.ggml.token_type"
    at = data.index(key) + len(key) + 4 + 4  # value type ARRAY, item type INT32
    huge = bytearray(data)
    huge[at:at + 8] = (1 << 31).to_bytes(8, "little")
    _refused(tmp_path, "huge-array", bytes(huge), "array 'tokenizer.ggml.token_type'", "2,147,483,648 items")
    nested = bytearray(data)
    nested[at - 4:at] = (9).to_bytes(4, "little")  # item type ARRAY
    _refused(tmp_path, "nested-array", bytes(nested), "array of arrays")
    strings = bytearray(data)
    tokens = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8
    strings[tokens:tokens + 8] = (1 << 40).to_bytes(8, "little")
    _refused(tmp_path, "huge-string-array", bytes(strings), "tokenizer.ggml.tokens", "strings declared")
    first = data.index(b"tok0") - 8
    long_string = bytearray(data)
    long_string[first:first + 8] = (1 << 62).to_bytes(8, "little")
    _refused(tmp_path, "long-string", bytes(long_string), "item 0 of 'tokenizer.ggml.tokens'", "bytes declared")


def test_offsets_that_are_unaligned_wrap_or_overlap_are_refused(tmp_path):
    data = _file(tmp_path / "good.gguf").read_bytes()
    offset_at = _info_offset(data, NAMES[1]) + 4 + 2 * 8 + 4
    original = struct.unpack_from("<Q", data, offset_at)[0]
    for label, value, expected in (("unaligned", original + 8, "not a multiple of general.alignment (32)"),
                                   ("wrap-1", (1 << 64) - 1, "not a multiple"),
                                   ("wrap-256", (1 << 64) - 256, "runs past the end"),
                                   ("overlap", original - 32, "runs into tensor")):
        damaged = bytearray(data)
        damaged[offset_at:offset_at + 8] = value.to_bytes(8, "little")
        _refused(tmp_path, label, bytes(damaged), expected)


def test_a_type_that_does_not_match_its_bytes_is_refused(tmp_path):
    data = _file(tmp_path / "good.gguf").read_bytes()
    type_at = _info_offset(data, NAMES[0]) + 4 + 2 * 8
    widened = bytearray(data)  # k's F16 read as F32 would take v's bytes
    widened[type_at:type_at + 4] = (0).to_bytes(4, "little")
    _refused(tmp_path, "f16-as-f32", bytes(widened), f"tensor {NAMES[0]!r} (F32", f"runs into tensor {NAMES[1]!r}")


def test_a_tensor_count_that_disagrees_with_the_table_is_refused(tmp_path):
    data = _file(tmp_path / "good.gguf").read_bytes()
    for label, count, expected in (("fewer", 2, "does not match the table"), ("more", 4, "")):
        damaged = bytearray(data)
        damaged[8:16] = count.to_bytes(8, "little")
        _refused(tmp_path, label, bytes(damaged), expected)


def test_integer_tensors_are_refused_when_the_file_is_opened(tmp_path):
    path = _file(tmp_path / "ints.gguf", extra_int=True)
    with pytest.raises(LayerscopeError, match=r"tensor 'blk.0.attn_q.weight' holds integers \(ggml type I32\)"):
        read_gguf_table(path)
    result = subprocess.run([sys.executable, "-m", "layerscope", "scan", str(path), "-q"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and str(path) in result.stderr and "I32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_damaged_headers_are_one_line(tmp_path):
    data = _file(tmp_path / "good.gguf").read_bytes()
    name_at = data.index(NAMES[2].encode())
    garbled = bytearray(data)
    garbled[name_at:name_at + 2] = b"\xff\xfe"
    _refused(tmp_path, "not-utf8", bytes(garbled), "not UTF-8")
    version = bytearray(data)
    version[4:8] = (7).to_bytes(4, "little")
    _refused(tmp_path, "version", bytes(version), "GGUF version 7")
    dims = bytearray(data)
    dims_at = _info_offset(data, NAMES[2])
    dims[dims_at:dims_at + 4] = (9).to_bytes(4, "little")
    _refused(tmp_path, "dims", bytes(dims), "9 dimensions")
    counts = bytearray(data)
    counts[16:24] = (1 << 40).to_bytes(8, "little")
    _refused(tmp_path, "kv-count", bytes(counts), "metadata count", "too large")


ARCHITECTURE_METADATA = {  # architecture → (general.name, extra tensors that change the config)
    "llama": ("SmolLM-like", ()),
    "llama ": ("mistral", ()),  # llama.cpp writes Mistral as llama; transformers renames it by general.name
    "qwen2": ("qwen", ()),
    "qwen3": ("qwen3", ()),
    "phi3": ("phi", ()),
    "stablelm": ("stablelm", ("blk.0.attn_q.bias",)),
    "gemma2": ("gemma", ()),
    "gemma3": ("gemma", ()),
    "starcoder2": ("starcoder", ()),
    "falcon": ("falcon", ()),
    "nemotron": ("nemotron", ()),
}


@pytest.mark.parametrize("label", sorted(ARCHITECTURE_METADATA))
def test_the_config_is_the_one_transformers_derives(tmp_path, label):
    """The config built from the fields read once equals transformers' load_gguf_checkpoint's, for every family
    transformers loads without re-splitting (names, defaults, tie_word_embeddings, vocab from the token list)."""
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from layerscope.checkpoint.ggufread import gguf_config, read_gguf

    architecture, (name, extra) = label.strip(), ARCHITECTURE_METADATA[label]
    path = tmp_path / f"{architecture}.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_block_count(2)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_layer_norm_eps(1e-5)
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    for tensor in ("blk.0.attn_k.weight", *extra):
        writer.add_tensor(tensor, rng.standard_normal((64,) if tensor.endswith("bias") else (32, 64)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    reference.pop("_model_name_or_path", None)
    ours = gguf_config(path, read_gguf(path))
    ours.pop("architectures", None)
    assert ours == reference
    assert ours["vocab_size"] == 300 and ours["num_hidden_layers"] == 2


def _open_in_fresh_process(path: Path, cache: str) -> dict:
    script = ("import json, sys; from layerscope.checkpoint.reader import open_checkpoint; "
              f"c = open_checkpoint(__import__('pathlib').Path({str(path)!r})); "
              "print(json.dumps({'transformers': 'transformers' in sys.modules, 'names': list(c.tensors), "
              "'config': c.config, 'fingerprint': c.fingerprint()}))")
    import json
    import os

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "LAYERSCOPE_CACHE_DIR": cache})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_layout_seen_before_is_named_without_transformers(tmp_path):
    """The second process reads the names and config from the layout cache (no transformers import, no meta
    build) and gets exactly what the first derived; a damaged entry is rebuilt; ``off`` writes nothing."""
    pytest.importorskip("transformers")
    path = _llama_file(tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    first = _open_in_fresh_process(path, str(cache))
    second = _open_in_fresh_process(path, str(cache))
    assert first["transformers"] and not second["transformers"]
    assert {k: v for k, v in first.items() if k != "transformers"} == {
        k: v for k, v in second.items() if k != "transformers"}
    assert "model.layers.0.mlp.up_proj.weight" in first["names"]
    entries = list((cache / "gguf-layouts").glob("*.json"))
    assert len(entries) == 1
    entries[0].write_text('{"key": "damaged"')
    third = _open_in_fresh_process(path, str(cache))
    assert third["transformers"] and third["names"] == first["names"]
    assert _open_in_fresh_process(path, str(cache))["transformers"] is False  # rebuilt and stored again
    _open_in_fresh_process(path, "off")
    assert not (Path("off") / "gguf-layouts").exists()


LLAMA_SHAPES = {"token_embd.weight": (300, 64), "output_norm.weight": (64,), "blk.0.attn_norm.weight": (64,),
                "blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64), "blk.0.attn_v.weight": (32, 64),
                "blk.0.attn_output.weight": (64, 64), "blk.0.ffn_norm.weight": (64,),
                "blk.0.ffn_gate.weight": (128, 64), "blk.0.ffn_up.weight": (128, 64), "blk.0.ffn_down.weight": (64, 128)}


def _llama_file(path: Path, drop: tuple[str, ...] = (), shapes: dict | None = None) -> Path:
    """A whole one-block Llama (hidden 64, 4 heads, 2 KV heads, FFN 128, 300 tokens), shapes as PyTorch's."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"tok{i}" for i in range(300)])
    rng = np.random.default_rng(0)
    for name, shape in {**LLAMA_SHAPES, **(shapes or {})}.items():
        if name not in drop:
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tensors_are_checked_against_the_model_the_metadata_builds(tmp_path):
    """A shape that contradicts its parameter is refused (both shapes, the config field); an expected matrix that
    is absent is named in the scan's model facts and on stderr; a tied output embedding is not missing."""
    pytest.importorskip("transformers")
    from layerscope.checkpoint.reader import open_checkpoint

    whole = open_checkpoint(_llama_file(tmp_path / "whole.gguf"))
    assert whole.missing == [] and "lm_head.weight" not in whole.tensors and whole.config["tie_word_embeddings"]
    lacking = _llama_file(tmp_path / "lacking.gguf", drop=("blk.0.attn_q.weight",))
    assert open_checkpoint(lacking).missing == ["model.layers.0.self_attn.q_proj.weight (blk.0.attn_q.weight)"]
    done = subprocess.run([sys.executable, "-m", "layerscope", "scan", str(lacking), "--out",
                           str(tmp_path / "scan.parquet")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "WARNING: 1 weight matrix that the architecture expects is absent" in done.stderr
    assert "model.layers.0.self_attn.q_proj.weight (blk.0.attn_q.weight)" in done.stderr
    from layerscope.tables import read_scan

    assert read_scan(tmp_path / "scan.parquet").attrs["missing"] == [
        "model.layers.0.self_attn.q_proj.weight (blk.0.attn_q.weight)"]  # once, under its live and GGUF names
    quiet = subprocess.run([sys.executable, "-m", "layerscope", "scan", str(lacking), "-q"], capture_output=True,
                           text=True)
    assert "WARNING: 1 weight matrix that the architecture expects is absent" in quiet.stderr and quiet.stdout == ""
    wrong = _llama_file(tmp_path / "wrong.gguf", shapes={"blk.0.attn_q.weight": (32, 64)})
    done = subprocess.run([sys.executable, "-m", "layerscope", "scan", str(wrong)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"error: {wrong}: tensor 'blk.0.attn_q.weight' (model.layers.0.self_attn.q_proj.weight) has shape [32, 64], "
        "but the model built from the file's metadata expects [64, 64] (hidden_size = 64)"), done.stderr


def test_a_dequantization_failure_names_the_file_and_the_tensor(tmp_path, monkeypatch):
    """Whatever gguf.quants raises on a tensor's bytes becomes one line naming the file, the tensor, its type and
    shape (gguf's own messages — 'cannot reshape array of size ...' — name neither)."""
    pytest.importorskip("transformers")
    from layerscope.checkpoint import ggufquant
    from layerscope.checkpoint.reader import open_checkpoint

    path = _llama_file(tmp_path / "model.gguf")
    checkpoint = open_checkpoint(path)

    def broken(*_args, **_kwargs):
        raise ValueError("cannot reshape array of size 66784 into shape (576,360)")

    monkeypatch.setattr(ggufquant, "dequantize", broken)
    with pytest.raises(LayerscopeError) as info:
        checkpoint.load("model.layers.0.mlp.up_proj.weight")
    assert str(info.value) == (f"{path}: tensor 'model.layers.0.mlp.up_proj.weight' (F32, shape [128, 64]) cannot be "
                               "dequantized (ValueError: cannot reshape array of size 66784 into shape (576,360))")


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_1"])
def test_torch_block_decoders_are_bit_identical_to_gguf(ggml_type):
    """The torch decoders of the common types give exactly gguf.quants' float32 values (scales of every
    magnitude, subnormal included), with llama.cpp's Q/K row permutation undone the same way after."""
    from layerscope.checkpoint.ggufquant import TORCH_DECODERS, dequantize

    qtype = gguf.GGMLQuantizationType[ggml_type]
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((64, 256)) * np.logspace(-7, 2, 64)[:, None]).astype(np.float32)
    raw = gguf.quants.quantize(data, qtype)
    expected = gguf.quants.dequantize(raw, qtype).reshape(64, 256)
    assert ggml_type in TORCH_DECODERS
    ours = dequantize(raw.tobytes(), ggml_type, (64, 256), None).numpy()
    assert np.array_equal(ours.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("ggml_type,block_bytes,scale_at", [("Q4_K", 144, (0, 4)), ("Q6_K", 210, (208, 210))])
def test_torch_k_quant_decoders_are_bit_identical_to_gguf(ggml_type, block_bytes, scale_at):
    """The K-quants of Q4_K_M files (Q4_K for most matrices, Q6_K for some): random blocks — every packing of
    scales, mins and high bits, float16 scales of every magnitude — decode to exactly gguf.quants' values."""
    from layerscope.checkpoint.ggufquant import TORCH_DECODERS, dequantize

    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, size=(96, block_bytes), dtype=np.uint8)
    halves = (scale_at[1] - scale_at[0]) // 2
    scales = (rng.standard_normal((96, halves)) * np.logspace(-6, 1, 96)[:, None]).astype(np.float16)
    blocks[:, scale_at[0]:scale_at[1]] = scales.view(np.uint8).reshape(96, 2 * halves)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type]).reshape(32, 768)
    assert ggml_type in TORCH_DECODERS
    ours = dequantize(blocks.tobytes(), ggml_type, (32, 768), None).numpy()
    assert np.array_equal(ours.view(np.uint32), expected.view(np.uint32))
