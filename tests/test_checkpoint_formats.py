"""Every safetensors dtype, pytorch_model.bin checkpoints, GGUF refusal and the hub cache layout."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from layerscope.checkpoint.reader import open_checkpoint, read_tensor
from layerscope.errors import LayerscopeError
from layerscope.spectral.scan import scan
from tests.builders import LLAMA_CONFIG, llama_tensors, write_checkpoint, write_raw_safetensors
from tests.cli_runner import run_cli  # noqa: E402

# dtype → (shape, bytes): every dtype the safetensors format defines.
ALL_DTYPES = {
    "F64": ([2, 2], 32), "F32": ([2, 2], 16), "F16": ([2, 2], 8), "BF16": ([2, 2], 8),
    "F8_E4M3": ([2, 2], 4), "F8_E5M2": ([2, 2], 4), "F8_E4M3FNUZ": ([2, 2], 4), "F8_E5M2FNUZ": ([2, 2], 4),
    "F8_E8M0": ([2, 2], 4), "F6_E2M3": ([4, 4], 12), "F6_E3M2": ([2, 4], 6), "F4": ([2, 4], 4),
    "I64": ([2], 16), "I32": ([2], 8), "I16": ([2], 4), "I8": ([2], 2),
    "U64": ([2], 16), "U32": ([2], 8), "U16": ([2], 4), "U8": ([2], 2), "BOOL": ([2], 2), "C64": ([2], 16),
}


@pytest.fixture
def every_dtype(tmp_path):
    header, data, offset = {}, b"", 0
    rng = np.random.default_rng(0)
    for dtype, (shape, size) in ALL_DTYPES.items():
        raw = rng.integers(0, 128, size, dtype=np.uint8).tobytes()  # < 128: no NaN patterns in F8/BOOL stays odd
        if dtype == "BOOL":
            raw = bytes(b & 1 for b in raw)
        header[dtype] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        data += raw
        offset += size
    path = tmp_path / "all.safetensors"
    write_raw_safetensors(path, header, data)
    return path


def test_every_safetensors_dtype_opens_and_reads_like_the_library(every_dtype):
    ckpt = open_checkpoint(every_dtype)
    assert set(ckpt.tensors) == set(ALL_DTYPES)
    with safe_open(every_dtype, "pt") as library:
        for dtype, info in ckpt.tensors.items():
            assert info.dtype == dtype and list(info.shape) == ALL_DTYPES[dtype][0]
            if dtype in ("F6_E2M3", "F6_E3M2"):
                with pytest.raises(LayerscopeError, match="packed 6-bit"):
                    read_tensor(info)
                continue
            ours = read_tensor(info)
            if dtype == "F4":  # decoded to float32: compare with the bit fields of the library's packed bytes
                packed = library.get_tensor(dtype).view(torch.uint8).reshape(-1).numpy()
                codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)
                sign = np.where(codes & 8, -1.0, 1.0)
                exp, man = (codes >> 1) & 3, codes & 1
                expected = sign * np.where(exp == 0, man * 0.5, 2.0 ** (exp - 1) * (1 + man / 2))
                np.testing.assert_array_equal(ours.reshape(-1).numpy(), expected)
                continue
            theirs = library.get_tensor(dtype)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert ours.view(torch.uint8).numpy().tobytes() == theirs.view(torch.uint8).numpy().tobytes()


def test_odd_dtypes_outside_blocks_do_not_break_a_scan(tmp_path):
    tensors = llama_tensors()
    folder = write_checkpoint(tmp_path / "m", tensors, config=LLAMA_CONFIG)
    plain = scan(folder, estimators=("alpha_hill",), progress=False)
    extra = dict(tensors)
    extra["model.rotary.freqs"] = torch.zeros(4, 4, dtype=torch.complex64)
    extra["model.layers.0.self_attn.e8m0"] = torch.ones(4, dtype=torch.float8_e8m0fnu)
    write_checkpoint(tmp_path / "m2", extra, config=LLAMA_CONFIG)
    table = scan(tmp_path / "m2", estimators=("alpha_hill",), progress=False)
    pd.testing.assert_frame_equal(table[plain.columns].drop(columns="file"), plain.drop(columns="file"))


# ---- pytorch_model.bin ----------------------------------------------------------------------

def _save_bin(folder, tensors, shards: int):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    names = list(tensors)
    if shards == 1:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    weight_map = {}
    for s in range(shards):
        shard = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        chunk = names[s::shards]
        torch.save({k: tensors[k] for k in chunk}, folder / shard)
        weight_map.update({k: shard for k in chunk})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shards", [1, 2])
def test_pytorch_bin_checkpoints_scan_like_safetensors(tmp_path, shards):
    tensors = llama_tensors()
    reference = scan(write_checkpoint(tmp_path / "st", tensors, config=LLAMA_CONFIG), progress=False)
    table = scan(_save_bin(tmp_path / "bin", tensors, shards), progress=False)
    assert table.attrs["fingerprint"] == reference.attrs["fingerprint"]
    pd.testing.assert_frame_equal(table.drop(columns="file"), reference.drop(columns="file"))


def test_corrupt_bin_and_gguf_give_one_line_errors(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not a zip or a pickle")
    with pytest.raises(LayerscopeError, match="cannot read as a torch checkpoint"):
        open_checkpoint(folder)
    only_gguf = tmp_path / "gguf"
    only_gguf.mkdir()
    gguf = only_gguf / "model-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    for target, needle in ((gguf, "shorter than a GGUF header"), (only_gguf, "scan the file itself")):
        result = run_cli("scan", str(target), "--quiet")
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr


# ---- hub cache layout -----------------------------------------------------------------------

def _hub_cache(root, revisions: dict[str, dict[str, torch.Tensor]], main: str):
    """models--org--name with blobs/, snapshots/<commit>/ symlinks and refs/main, as huggingface_hub lays it out."""
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for commit, tensors in revisions.items():
        depth = 1 + max(int(name.split(".")[2]) for name in tensors if name.startswith("model.layers."))
        staging = write_checkpoint(root / f"staging-{commit}", tensors, config={**LLAMA_CONFIG,
                                                                             "num_hidden_layers": depth})
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in staging.iterdir():
            blob = repo / "blobs" / f"{commit}-{file.name}"
            file.rename(blob)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs" / "main").write_text(main)
    (repo / "refs" / "v2").write_text("b" * 40)
    return repo


def test_hub_cache_folder_reads_the_main_snapshot_or_a_revision(tmp_path):
    one, two = llama_tensors(), llama_tensors(layers=3)
    repo = _hub_cache(tmp_path, {"a" * 40: one, "b" * 40: two}, main="a" * 40)
    assert scan(repo, progress=False).attrs["num_layers"] == 2
    assert scan(repo, revision="v2", progress=False)["layer"].max() == 2
    assert scan(repo, revision="b" * 40, progress=False)["layer"].max() == 2
    with pytest.raises(LayerscopeError, match="revision 'nope' has no snapshot"):
        open_checkpoint(repo, revision="nope")
