"""layerscope: spectral diagnostics and budgeted LoRA-expert allocation plans for LLM checkpoints.

The public names are imported on first use (PEP 562), so ``import layerscope`` and
``layerscope --help`` do not pull in torch.
"""

from __future__ import annotations

import importlib

from layerscope.errors import LayerscopeError

__version__ = "0.2.0"  # the package version (pyproject reads it); see CHANGELOG.md

_LAZY = {
    "LoraSettings": "layerscope.planning", "Plan": "layerscope.planning", "plan": "layerscope.planning",
    "compare": "layerscope.spectral.compare", "compare_layers": "layerscope.spectral.compare",
    "layer_summary": "layerscope.spectral.scan", "scan": "layerscope.adapters",
    "read_scan": "layerscope.tables", "write_scan": "layerscope.tables", "summary": "layerscope.spectral.rank",
    "esd": "layerscope.spectral.single",
}

# Subpackages a user reaches as attributes (``layerscope.experiments.compare_plans(...)`` after a bare
# ``import layerscope``), imported on first use like the names above.
_SUBPACKAGES = ("activations", "adapters", "checkpoint", "experiments", "export", "planning", "runtime", "spectral",
                "viz")

__all__ = ["LayerscopeError", "__version__", *_LAZY, *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"layerscope.{name}")
    raise AttributeError(f"module 'layerscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
