"""Every hostile or sloppy input reported against the reader, each with its exact expected outcome.

Each case goes through the real CLI entry point (``layerscope.cli.main``, in process) and must end
in exactly one line on stderr and exit status 2 — or, for the valid-but-unusual files, in a
correct result.  Nothing is ever left at ``--out`` by a failed command.
"""

from __future__ import annotations

import json
import math
import struct
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import layerscope.spectral.scan  # noqa: F401  (the module the CLI's scan command imports from)
from layerscope.cli import main
from layerscope.spectral.estimators import ESTIMATORS
from layerscope.spectral.scan import scan
from tests.builders import LLAMA_CONFIG, llama_tensors, random_matrix, write_checkpoint

Q = "model.layers.0.self_attn.q_proj.weight"


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["layerscope", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _raw_file(folder, header_text: str, data: bytes, length: int | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    raw = header_text.encode("utf-8", "surrogatepass")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return folder


def _entry(dtype='"F32"', shape="[2, 2]", offsets="[0, 16]", name=Q) -> str:
    return f'"{name}": {{"dtype": {dtype}, "shape": {shape}, "data_offsets": {offsets}}}'


# (header JSON text, data bytes, header length or None, fragment the one-line error must hold)
CORRUPT = {
    "dtype is an object": ("{" + _entry(dtype='{"a": 1}') + "}", bytes(16), None, "field 'dtype' a JSON object"),
    "dtype is a list": ("{" + _entry(dtype='["F32"]') + "}", bytes(16), None, "field 'dtype' a JSON array"),
    "integer past Python's int-string limit": ("{" + _entry(shape="[" + "9" * 5000 + ", 2]") + "}", bytes(16), None,
                                               "integer of 5000 digits"),
    "dimension of 2^63": ("{" + _entry(shape="[9223372036854775808, 0]", offsets="[0, 0]") + "}", b"", None,
                          "not below 2^63"),
    "shape product overflows": ("{" + _entry(shape="[4294967296, 4294967296, 4]", offsets="[0, 0]") + "}", b"",
                                None, "overflows 64 bits"),
    "deeply nested JSON": ('{"__metadata__": ' + "[" * 100000 + "]" * 100000 + "}", b"", None,
                           "nested too deeply"),
    "true as a shape entry": ("{" + _entry(shape="[true, 2]", offsets="[0, 8]") + "}", bytes(8), None,
                              "holds true"),
    "false as an offset": ("{" + _entry(offsets="[false, 16]") + "}", bytes(16), None, "holds false"),
    "lone surrogate in a name": ("{" + _entry(name="model.layers.0.q\\ud800") + "}", bytes(16), None,
                                 "lone UTF-16 surrogate"),
    "bytes after the last tensor": ("{" + _entry() + "}", bytes(20), None, "last 4 bytes of the data section"),
    "gap between tensors": ("{" + _entry() + ", " + _entry(name="b", offsets="[20, 36]") + "}", bytes(36), None,
                            "leaves a gap after tensor"),
    "duplicate tensor name": ("{" + _entry() + ", " + _entry(offsets="[16, 32]") + "}", bytes(32), None,
                              "repeats key"),
    "duplicate field": ('{"' + Q + '": {"dtype": "F32", "dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}',
                        bytes(16), None, "repeats key 'dtype'"),
    "metadata not string to string": ('{"__metadata__": {"format": 1}, ' + _entry() + "}", bytes(16), None,
                                      "__metadata__['format'] is a JSON integer"),
    "metadata a list": ('{"__metadata__": ["pt"], ' + _entry() + "}", bytes(16), None, "'__metadata__' is a JSON array"),
    "NaN in the header": ("{" + _entry(shape="[NaN, 2]") + "}", bytes(16), None, "NaN"),
    "unknown dtype": ("{" + _entry(dtype='"F8_E4M3FN"') + "}", bytes(16), None, "'F8_E4M3FN' is not a safetensors"),
}


def _padded_header_shortened(folder):
    """A valid file whose header was padded with spaces, then its length field shortened by the padding:
    the data section would start early and every tensor would read shifted values."""
    header = ("{" + _entry() + "}").encode()
    padding = 8 - len(header) % 8 or 8
    folder.mkdir(parents=True, exist_ok=True)
    data = np.arange(4, dtype=np.float32).tobytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b" " * padding + data)
    return folder


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_headers_give_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case):
    text, data, length, fragment = CORRUPT[case]
    folder = _raw_file(tmp_path / "model", text, data, length)
    out = tmp_path / "out" / "scan.csv"
    code, stdout, stderr = cli(capsys, monkeypatch, "scan", str(folder), "--out", str(out), "--quiet")
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert "model.safetensors" in stderr and fragment in stderr, stderr
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_header_length_shortened_by_its_padding_is_refused(tmp_path, capsys, monkeypatch):
    folder = _padded_header_shortened(tmp_path / "model")
    code, _, stderr = cli(capsys, monkeypatch, "scan", str(folder), "--quiet")
    assert code == 2 and stderr.count("\n") == 1
    assert "belong to no tensor" in stderr


@pytest.mark.parametrize("architectures, fragment", [('"LlamaForCausalLM"', "a JSON string"),
                                                     ("7", "a JSON integer"), ('["Llama", 3]', "a JSON array")])
def test_config_architectures_must_be_a_list_of_strings(tmp_path, capsys, monkeypatch, architectures, fragment):
    folder = write_checkpoint(tmp_path / "m", llama_tensors(), config=LLAMA_CONFIG)
    plain = {k: v for k, v in LLAMA_CONFIG.items() if k != "architectures"}
    config = json.dumps(plain)[:-1] + f', "architectures": {architectures}}}'
    (folder / "config.json").write_text(config)
    code, _, stderr = cli(capsys, monkeypatch, "scan", str(folder), "--quiet")
    assert code == 2 and stderr.count("\n") == 1
    assert "config.json: field 'architectures'" in stderr and fragment in stderr


def test_config_count_of_the_wrong_type(tmp_path, capsys, monkeypatch):
    folder = write_checkpoint(tmp_path / "m", llama_tensors(), config={**LLAMA_CONFIG, "num_hidden_layers": True})
    code, _, stderr = cli(capsys, monkeypatch, "scan", str(folder), "--quiet")
    assert code == 2 and "field 'num_hidden_layers' is true" in stderr


def test_zero_size_expert_stack_is_valid_and_scanned(tmp_path):
    """A (experts, 0, hidden) fused expert tensor is a valid safetensors tensor: the scan reports it as
    having too few eigenvalues and goes on."""
    tensors = llama_tensors()
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.zeros(4, 0, 16)
    tensors["model.layers.0.mlp.experts.down_proj"] = torch.zeros(0, 16, 8)
    folder = write_checkpoint(tmp_path / "m", tensors, config={**LLAMA_CONFIG, "model_type": "qwen3_moe"})
    table = scan(folder, progress=False)
    assert len(table[table["kind"] == "projection"]) == 14
    expert_rows = table[table["tensor"].str.contains("experts")]
    assert set(expert_rows["status"]) <= {"too_few_evals"}


# q_proj replaced by a 96 x 64 matrix: a config without sizes, so no architecture shape applies
SHAPELESS_CONFIG = {key: value for key, value in LLAMA_CONFIG.items() if key != "hidden_size" and "heads" not in key}


def test_huge_finite_float64_weights_are_analysed(tmp_path):
    """|w| ~ 1e200: WᵀW overflows float64, so the matrix is scaled by a power of two first.  The
    scale-invariant metrics equal those of the unscaled matrix, the log norms are shifted exactly."""
    base = random_matrix(96, 64, seed=3, dtype=torch.float64)
    small = write_checkpoint(tmp_path / "small", {**llama_tensors(), Q: base}, config=SHAPELESS_CONFIG)
    huge = write_checkpoint(tmp_path / "huge", {**llama_tensors(), Q: base * 1e200}, config=SHAPELESS_CONFIG)
    row_small = scan(small, progress=False).set_index("tensor").loc[Q]
    row = scan(huge, progress=False).set_index("tensor").loc[Q]
    assert row["status"] == "ok" and "float64's range" in row["note"]
    for column in ("alpha", "alpha_hill", "D", "num_pl_spikes", "stable_rank", "entropy"):
        assert row[column] == pytest.approx(row_small[column], rel=1e-9), column
    for column in ("log_norm", "log_spectral_norm"):
        assert row[column] == pytest.approx(row_small[column] + 400, rel=1e-12), column
    assert math.isnan(row["lambda_max"]) and math.isnan(row["alpha_peak"])


def test_large_but_representable_weights_keep_every_metric(tmp_path):
    """|w| ~ 1e140 in float64 (λ ~ 1e282): scaled before squaring, every metric exact in true units."""
    base = random_matrix(96, 64, seed=4, dtype=torch.float64)
    table = scan(write_checkpoint(tmp_path / "m", {**llama_tensors(), Q: base * 1e140}, config=SHAPELESS_CONFIG),
                 progress=False).set_index("tensor")
    eigs = np.linalg.eigvalsh((base.numpy() * 1e140).T @ (base.numpy() * 1e140))
    assert table.loc[Q, "status"] == "ok" and table.loc[Q, "note"] is None
    assert table.loc[Q, "lambda_max"] == pytest.approx(eigs[-1], rel=1e-9)
    assert table.loc[Q, "alpha_hill"] == pytest.approx(ESTIMATORS["alpha_hill"](eigs).alpha, rel=1e-9)


def test_path_with_a_newline_gives_one_line(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "a\nb\x1b[31m"
    code, _, stderr = cli(capsys, monkeypatch, "scan", str(missing))
    assert code == 2 and stderr.count("\n") == 1
    assert "a\\nb\\x1b[31m" in stderr


def test_tensor_name_with_control_characters_gives_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"bad\nname\r\x07": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + b"x")
    code, _, stderr = cli(capsys, monkeypatch, "scan", str(folder), "--quiet")
    assert code == 2 and stderr.count("\n") == 1


def test_unwritable_out_is_reported_before_the_scan(tmp_path, capsys, monkeypatch):
    folder = write_checkpoint(tmp_path / "m", llama_tensors(), config=LLAMA_CONFIG)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    called = []
    monkeypatch.setattr(sys.modules["layerscope.spectral.scan"], "scan", lambda *a, **k: called.append(1))
    code, _, stderr = cli(capsys, monkeypatch, "scan", str(folder), "--out", str(blocker / "scan.parquet"))
    assert code == 2 and stderr.count("\n") == 1 and not called
    assert "--out" in stderr and str(blocker / "scan.parquet") in stderr and ".tmp" not in stderr
