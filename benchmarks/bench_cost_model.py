"""A cost model for scanning DeepSeek-V3 (671B) from per-shape constants measured on this machine.

    python benchmarks/bench_cost_model.py [--threads 2]

DeepSeek-V3's matrices (config: hidden 7168, 61 layers of which the first 3 are dense with MLP 18432, 58 MoE layers
of 256 routed experts + 1 shared of MLP 2048, MLA with q_lora_rank 1536, kv_lora_rank 512, 128 heads of
qk_nope 128 + qk_rope 64 and v 128, vocabulary 129280): every distinct (rows, cols) shape is listed with its
count.  For each shape this measures, on this machine in float64 with ``--threads`` threads, what the scan
spends per matrix at minimum: the Gram WᵀW (converted from bf16, the stored FP8 dequantizes to at least that)
and ``eigvalsh`` of it.  Shapes whose Gram is 7168 wide are measured once at their Gram and eigensolve (the
eigensolve does not depend on the long side) with the Gram scaled by the long side.  The total is the floor
of a scan on this machine; RESULTS §15 compares a real scan to the same floor (0.67–0.87× on Qwen3 and gpt-oss
cuts, i.e. the scan overlaps reading and fitting with it).  The GPU estimate scales one measured H200 constant
(RESULTS §10) by the eigensolve's m³ and divides by the ranks; see RESULTS for its assumptions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HIDDEN, VOCAB, LAYERS, DENSE_LAYERS, EXPERTS = 7168, 129280, 61, 3, 256 + 1
MOE_INTER, DENSE_INTER, Q_LORA, KV_LORA, HEADS, NOPE, ROPE, V = 2048, 18432, 1536, 512, 128, 128, 64, 128
OUT = Path(__file__).parent / "results" / "cost_model_deepseek_v3.json"


def deepseek_v3_shapes() -> dict[tuple[int, int], int]:
    """(rows, cols) → how many such matrices DeepSeek-V3's checkpoint holds (main model, no MTP block)."""
    moe = LAYERS - DENSE_LAYERS
    shapes: dict[tuple[int, int], int] = {}

    def add(shape: tuple[int, int], count: int) -> None:
        shapes[shape] = shapes.get(shape, 0) + count

    add((VOCAB, HIDDEN), 2)  # embed_tokens, lm_head
    add((Q_LORA, HIDDEN), LAYERS)  # q_a_proj
    add((HEADS * (NOPE + ROPE), Q_LORA), LAYERS)  # q_b_proj
    add((KV_LORA + ROPE, HIDDEN), LAYERS)  # kv_a_proj_with_mqa
    add((HEADS * (NOPE + V), KV_LORA), LAYERS)  # kv_b_proj
    add((HIDDEN, HEADS * V), LAYERS)  # o_proj
    add((DENSE_INTER, HIDDEN), 2 * DENSE_LAYERS)  # dense gate, up
    add((HIDDEN, DENSE_INTER), DENSE_LAYERS)  # dense down
    add((MOE_INTER, HIDDEN), 2 * moe * EXPERTS)  # experts' and shared expert's gate, up
    add((HIDDEN, MOE_INTER), moe * EXPERTS)  # down
    add((256, HIDDEN), moe)  # router
    return shapes


EIGVALSH_SECONDS: dict[int, float] = {}  # the eigensolve depends on the Gram's width only: measured once per width


def measure(rows: int, cols: int, threads: int, long_cap: int = 8192) -> dict:
    """Seconds for one bf16 matrix's float64 Gram and eigvalsh; the long side is measured up to ``long_cap`` and
    the Gram time scaled linearly beyond it (it is a sum over row chunks)."""
    torch.set_num_threads(threads)
    long_side, short = max(rows, cols), min(rows, cols)
    measured_long = min(long_side, long_cap)
    weight = torch.randn(measured_long, short).to(torch.bfloat16)
    started = time.perf_counter()
    gram = torch.zeros(short, short, dtype=torch.float64)
    for chunk in torch.split(weight, 4096):
        chunk = chunk.to(torch.float64)
        gram.addmm_(chunk.mT, chunk)
    gram_s = (time.perf_counter() - started) * long_side / measured_long
    if short not in EIGVALSH_SECONDS:
        started = time.perf_counter()
        torch.linalg.eigvalsh(gram)
        EIGVALSH_SECONDS[short] = time.perf_counter() - started
    eig_s = EIGVALSH_SECONDS[short]
    return {"shape": [rows, cols], "gram_s": gram_s, "eigvalsh_s": eig_s, "seconds": gram_s + eig_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from common import machine, today

    shapes = deepseek_v3_shapes()
    parts, total = [], 0.0
    for (rows, cols), count in sorted(shapes.items(), key=lambda item: -item[1]):
        part = measure(rows, cols, args.threads)
        part.update(count=count, total_s=part["seconds"] * count)
        total += part["total_s"]
        parts.append(part)
        print(json.dumps(part))
    result = {"model": "DeepSeek-V3 (671B) shapes", "date": today(), "machine": machine(), "threads": args.threads,
              "matrices": sum(shapes.values()), "floor_seconds": total, "floor_hours": total / 3600, "parts": parts}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "parts"}, indent=1))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
