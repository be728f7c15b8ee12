"""layerscope: spectral diagnostics and budgeted LoRA-expert allocation plans for LLM checkpoints."""

from layerscope.errors import LayerscopeError
from layerscope.planning import LoraSettings, Plan, plan
from layerscope.spectral.compare import compare, compare_layers
from layerscope.spectral.scan import layer_summary, scan
from layerscope.tables import read_scan, write_scan

__version__ = "0.1.0"

__all__ = ["LayerscopeError", "LoraSettings", "Plan", "__version__", "compare", "compare_layers", "layer_summary",
           "plan", "read_scan", "scan", "write_scan"]
