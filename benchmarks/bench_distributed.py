"""One process × 2 threads against torchrun with 2 processes × 1 thread, on the Llama-2-7B-shaped checkpoint.

    python benchmarks/bench_distributed.py [--layers 4] [--dir benchmarks/_data/llama7b]

Eigensolvers scale poorly with threads, so on a 2-core machine two single-threaded ranks may beat
one two-threaded process.  ``--layers N`` scans the first N blocks (``--include``); 0 scans all 32.
Wall time includes process start-up.  The two runs use different BLAS thread counts, so their
tables agree to rounding (reported), not byte for byte; with equal thread counts they are
byte-identical (tests/test_distributed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from bench_llama7b import generate  # noqa: E402
from common import machine, today  # noqa: E402


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path(__file__).parent / "_data" / "llama7b")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    generate(args.dir)
    scope = ["--include", rf"layers\.({'|'.join(map(str, range(args.layers)))})\."] if args.layers else []
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    with tempfile.TemporaryDirectory() as tmp:
        single = run([sys.executable, "-m", "layerscope", "scan", str(args.dir), "--out", f"{tmp}/one.parquet",
                      "--quiet", *scope], threads=2)
        multi = run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "layerscope", "scan", str(args.dir),
                     "--out", f"{tmp}/two.parquet", "--quiet", *scope], threads=1)
        one, two = pd.read_parquet(f"{tmp}/one.parquet"), pd.read_parquet(f"{tmp}/two.parquet")
    numeric = [c for c in one.columns if pd.api.types.is_float_dtype(one[c])]
    relative = ((one[numeric] - two[numeric]).abs() / one[numeric].abs().clip(lower=1e-300)).max()
    print(json.dumps({"blocks": args.layers or 32, "matrices": len(one),
                      "one_process_2_threads_s": round(single, 1), "two_processes_1_thread_s": round(multi, 1),
                      "speedup": round(single / multi, 2), "same_rows": list(one["name"]) == list(two["name"]),
                      "max_relative_difference": {c: float(f"{v:.2g}") for c, v in relative.items() if v > 0},
                      "machine": machine(), "date": today()}, indent=1))


if __name__ == "__main__":
    main()
