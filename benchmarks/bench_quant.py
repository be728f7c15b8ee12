"""Scanning quantized checkpoints: time and peak memory of dequantize-one-tensor-at-a-time.

Builds a Llama-2-7B-shaped slice (``--layers`` blocks of 4096/11008 projections) twice: FP8
block-scaled (DeepSeek-V3 layout: F8_E4M3 + 128x128 ``weight_scale_inv``) and GPTQ int4 (group
128).  Each is scanned by layerscope (``alpha_hill`` only, so the eigensolver does not hide the
dequantization cost) in a fresh process, and compared in the same run with the common reference
path: ``safetensors.torch.load_file`` of the whole shard, every weight dequantized up front
(float32, as transformers' own dequantizers produce it), then the same spectra.  Peak RSS is the
process high-water mark.  Usage: python benchmarks/bench_quant.py [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine, today  # noqa: E402

HIDDEN, INTER = 4096, 11008
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
          "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def _fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    blocks = w.reshape(rows // 128, 128, cols // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    codes = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return {"weight": codes, "weight_scale_inv": scale.float()}


def _gptq(w: torch.Tensor) -> dict[str, torch.Tensor]:
    out_f, in_f = w.shape
    groups = in_f // 128
    wt = w.T.reshape(groups, 128, out_f)
    lo, hi = wt.amin(dim=1), wt.amax(dim=1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(wt / scale[:, None]) + zero[:, None], 0, 15).to(torch.int64).reshape(in_f, out_f)
    shifts = torch.arange(0, 32, 4)
    qweight = (q.reshape(in_f // 8, 8, out_f) << shifts[None, :, None]).sum(dim=1)
    z = (zero.to(torch.int64) - 1) & 0xF
    qzeros = (z.reshape(groups, out_f // 8, 8) << shifts).sum(dim=-1)
    as_i32 = lambda t: torch.from_numpy(t.numpy().astype(np.uint32).view(np.int32))
    return {"qweight": as_i32(qweight), "qzeros": as_i32(qzeros), "scales": scale.half()}


def build(folder: Path, fmt: str, layers: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    gen = torch.Generator().manual_seed(0)
    for layer in range(layers):
        for module, (rows, cols) in SHAPES.items():
            w = torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
            parts = _fp8(w) if fmt == "fp8" else _gptq(w)
            for suffix, t in parts.items():
                tensors[f"model.layers.{layer}.{module}.{suffix}"] = t
    qconfig = ({"quant_method": "fp8", "weight_block_size": [128, 128]} if fmt == "fp8"
               else {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers,
                                                    "quantization_config": qconfig}))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


LAYERSCOPE = """
import sys, time, json
from benchmarks.common import peak_rss_mib
from layerscope import scan
t = time.perf_counter()
table = scan(sys.argv[1], estimators=("alpha_hill",), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "rss": peak_rss_mib(), "matrices": len(table),
                  "alpha_hill": table["alpha_hill"].tolist()}))
"""

REFERENCE = """
import sys, time, json, math, torch
from safetensors.torch import load_file
from benchmarks.common import peak_rss_mib
from layerscope.checkpoint.quantization import dequantize_fp8_block, dequantize_gptq
from layerscope.spectral.estimators import ESTIMATORS
t = time.perf_counter()
state = load_file(sys.argv[1] + "/model.safetensors")
weights = {}
for name in list(state):
    if name.endswith(".weight") and name.replace(".weight", ".weight_scale_inv") in state:
        weights[name] = dequantize_fp8_block(state[name], state[name + "_scale_inv"], 128, 128).float()
    elif name.endswith(".qweight"):
        base = name.removesuffix(".qweight")
        weights[base] = dequantize_gptq(state[name], state[base + ".qzeros"], state[base + ".scales"], None, 4, 1).float()
alphas = []
for w in weights.values():
    tall = w if w.shape[0] >= w.shape[1] else w.T
    eigs = torch.linalg.eigvalsh(tall.double().T @ tall.double()).clamp_min(0).numpy()
    alphas.append(ESTIMATORS["alpha_hill"](eigs).alpha)
print(json.dumps({"seconds": time.perf_counter() - t, "rss": peak_rss_mib(), "matrices": len(weights),
                  "alpha_hill": alphas}))
"""


def run(code: str, folder: Path) -> dict:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, cwd=root,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(f"# {machine()}, {today()}, {args.layers} Llama-2-7B-shaped blocks")
    print("| format | checkpoint (MiB) | layerscope s | layerscope peak RSS MiB | load-all reference s | "
          "reference peak RSS MiB | memory ratio | max alpha_hill difference |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("fp8", "gptq"):
            folder = build(Path(tmp) / fmt, fmt, args.layers)
            size = (folder / "model.safetensors").stat().st_size / 2**20
            ours, ref = run(LAYERSCOPE, folder), run(REFERENCE, folder)
            assert ours["matrices"] == ref["matrices"]
            diff = max(abs(a - b) for a, b in zip(sorted(ours["alpha_hill"]), sorted(ref["alpha_hill"])))
            print(f"| {fmt} | {size:.0f} | {ours['seconds']:.1f} | {ours['rss']:.0f} | {ref['seconds']:.1f} | "
                  f"{ref['rss']:.0f} | {ref['rss'] / ours['rss']:.2f}x less | {diff:.1e} |")
            time.sleep(1)


if __name__ == "__main__":
    main()
