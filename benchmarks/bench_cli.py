"""Wall time of `layerscope --help` and of every subcommand's `--help` (fresh process each, median of 5).

    python benchmarks/bench_cli.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402


def main() -> None:
    from layerscope.cli import cli

    results = {}
    for args in [["--help"], *[[name, "--help"] for name in sorted(cli.commands)]]:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "layerscope", *args], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - started)
        results[" ".join(args)] = round(statistics.median(times), 3)
    print(json.dumps({"median_s": results, "max_s": max(results.values()), "machine": machine(), "date": today()},
                     indent=1))


if __name__ == "__main__":
    main()
