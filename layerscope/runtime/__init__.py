"""Train a plan: MoE-LoRA / MoR wrappers, apply_plan, strict save/load, PEFT export."""

from layerscope.runtime.apply import adapters, apply_plan, aux_loss, describe, live_counts, router_stats
from layerscope.runtime.io import export_peft_adapter, load_adapters, save_adapters
from layerscope.runtime.layers import MoELoraLinear
from layerscope.runtime.optim import optimizer_groups

__all__ = ["MoELoraLinear", "adapters", "apply_plan", "aux_loss", "describe", "export_peft_adapter",
           "live_counts", "load_adapters", "optimizer_groups", "router_stats", "save_adapters"]
