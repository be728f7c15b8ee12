"""KS power-law fit on n = 4096 eigenvalues: layerscope's vectorised scan vs powerlaw.Fit.

    python benchmarks/bench_ks_fit.py [--n 4096] [--repeats 3]

Both scan every candidate xmin (powerlaw.Fit with no xmin given, alpha range [1, inf)).
The spectrum is a Marchenko-Pastur-like bulk plus a Pareto(alpha=2.5) tail, like a trained
layer's.  Reports median times, the ratio, and that alpha and xmin agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402


def spectrum(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bulk = rng.chisquare(8, size=n - n // 8) / 8
    tail = 2.0 * (1 - rng.random(n // 8)) ** (-1 / 1.5)
    return np.sort(np.concatenate([bulk, tail]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import powerlaw

    from layerscope.spectral.estimators import alpha_ww

    eigs = spectrum(args.n)
    tensor = torch.as_tensor(eigs)
    alpha_ww(tensor)  # warm-up
    ours, theirs = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fit = alpha_ww(tensor)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = powerlaw.Fit(eigs[eigs > 1e-5], parameter_ranges={"alpha": [1, None]}, verbose=False)
        theirs.append(time.perf_counter() - t)
    report = {
        "benchmark": "ks_fit_vs_powerlaw",
        "n": args.n,
        "layerscope_alpha": fit.alpha, "powerlaw_alpha": float(ref.power_law.alpha),
        "layerscope_xmin": fit.xmin, "powerlaw_xmin": float(ref.xmin),
        "layerscope_s": statistics.median(ours),
        "powerlaw_s": statistics.median(theirs),
        "speedup": statistics.median(theirs) / statistics.median(ours),
        "powerlaw_version": powerlaw.__version__ if hasattr(powerlaw, "__version__") else "2.0",
        "repeats": args.repeats,
        "machine": machine(),
        "date": today(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
