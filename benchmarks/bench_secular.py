"""W + ΔW eigenvalues: the low-rank update (secular equation) against a full eigendecomposition.

    .venv/bin/python benchmarks/bench_secular.py [--sizes 384,768,1536,2048] [--ranks 1,2,8] [--repeats 3]

For each M (a square M × M base weight, as attention projections are) and LoRA rank r: the full path forms
W + s·B·A, its Gram and ``eigvalsh`` (what a W + ΔW row cost before); the update path forms the rank-2r
Gram update from the factors and solves it from the base eigendecomposition (computed once, timed apart).
Reported: the median seconds of each, their ratio, the largest eigenvalue error relative to λ_max, and the
cost constant ``ratio · M / 2r`` that ``layerscope.adapters.incremental.SECULAR_COST`` is set from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402

from layerscope.adapters.incremental import gram_update  # noqa: E402
from layerscope.adapters.updates import Update  # noqa: E402
from layerscope.spectral.secular import updated_eigenvalues  # noqa: E402


def median_seconds(work, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def measure(size: int, rank: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(size + rank)
    weight = torch.randn(size, size, generator=generator, dtype=torch.float64) / size ** 0.5
    update = Update("m", None, torch.randn(rank, size, generator=generator, dtype=torch.float64) / size ** 0.5,
                    torch.randn(size, rank, generator=generator, dtype=torch.float64) * 0.05, 2.0, "m", "m", "F64")

    def full():
        merged = weight + update.scaling * update.B @ update.A
        return torch.linalg.eigvalsh(merged.T @ merged)

    started = time.perf_counter()
    values, vectors = torch.linalg.eigh(weight.T @ weight)
    base_seconds = time.perf_counter() - started
    full_seconds, reference = median_seconds(full, repeats)
    update_seconds, result = median_seconds(
        lambda: updated_eigenvalues(values, vectors, *gram_update(weight, update)), repeats)
    ratio = update_seconds / full_seconds
    return {"M": size, "rank": rank, "full_s": round(full_seconds, 4), "update_s": round(update_seconds, 4),
            "update_over_full": round(ratio, 2), "cost_constant": round(ratio * size / (2 * rank)),
            "base_eigh_s": round(base_seconds, 3),
            "max_error_rel_lambda_max": float((result.eigenvalues - reference).abs().max() / reference[-1]),
            "invariant_error": result.invariant_error, "unconverged": result.unconverged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="384,768,1536,2048")
    parser.add_argument("--ranks", default="1,2,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for size in (int(v) for v in args.sizes.split(",")):
        for rank in (int(v) for v in args.ranks.split(",")):
            rows.append(measure(size, rank, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "secular", "rows": rows, "torch_threads": torch.get_num_threads(),
                      "machine": machine(), "date": today()}, indent=1))


if __name__ == "__main__":
    main()
