"""`layerscope --help` and every subcommand's `--help` import no heavy library (torch, pandas, numpy,
scipy, transformers): they answer from click and layerscope.names alone.  (Timings are measured in
benchmarks/bench_cli.py, not asserted here.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerscope import names

HEAVY = ("torch", "pandas", "numpy", "scipy", "transformers", "matplotlib", "safetensors")
PROBE = """
import json, sys
sys.argv = ["layerscope", *json.loads(sys.argv[1])]
from layerscope.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def _subcommands() -> list[str]:
    from layerscope.cli import cli

    return sorted(cli.commands)


@pytest.mark.parametrize("args", [[], ["--help"], *[[name, "--help"] for name in _subcommands()]],
                         ids=lambda a: " ".join(a) or "bare")
def test_help_imports_no_heavy_library(args):
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_cli_names_match_the_registries():
    from layerscope.export import EXPORTERS
    from layerscope.planning import STRATEGIES
    from layerscope.spectral.columns import FIT_COLUMNS
    from layerscope.spectral.estimators import ESTIMATORS

    assert tuple(ESTIMATORS) == names.SPECTRAL_ESTIMATORS
    assert set(names.ALL_ESTIMATORS) == set(FIT_COLUMNS)
    assert tuple(STRATEGIES) == names.STRATEGIES
    assert tuple(EXPORTERS) == names.EXPORT_FORMATS
