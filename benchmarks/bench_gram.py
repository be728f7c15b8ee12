"""The two kernels of a scan on CPU: Gram accumulation (BLAS syrk vs batched GEMM) and eigvalsh.

    python benchmarks/bench_gram.py [--repeats 3]

bf16 weights with Llama-2-7B shapes (4096 x 4096 and 11008 x 4096) and a MiniLM-sized one
(1536 x 384); every Gram in float32 and float64 both ways, and torch.linalg.eigvalsh of the
resulting Gram.  Best of the repeats (these are kernel timings; noise only adds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402

from layerscope.spectral.esd import GRAM_CHUNK_BYTES, _grams_batched, _grams_syrk  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (1536, 384)]


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        weight = torch.randn(1, *shape).to(torch.bfloat16)
        for dtype in (torch.float32, torch.float64):
            gram = _grams_syrk(weight, dtype, GRAM_CHUNK_BYTES)
            rows.append({
                "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).removeprefix("torch."),
                "gemm_s": best_time(partial(_grams_batched, weight, dtype, GRAM_CHUNK_BYTES), args.repeats),
                "syrk_s": best_time(partial(_grams_syrk, weight, dtype, GRAM_CHUNK_BYTES), args.repeats),
                "eigvalsh_s": best_time(partial(torch.linalg.eigvalsh, gram, UPLO="L"), args.repeats),
            })
    print(json.dumps({"benchmark": "gram_and_eigvalsh_kernels", "rows": rows, "machine": machine(),
                      "date": today()}, indent=1))


if __name__ == "__main__":
    main()
