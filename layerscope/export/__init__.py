"""Exports of a plan to what trainers read: PEFT LoraConfig JSON, MoLA arguments, axolotl, MixLoRA, a flat table."""

from layerscope.export.api import EXPORTERS, export_plan
from layerscope.export.formats import to_mola_args, to_peft_config, to_table

__all__ = ["EXPORTERS", "export_plan", "to_mola_args", "to_peft_config", "to_table"]
