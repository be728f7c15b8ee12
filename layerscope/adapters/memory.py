"""Scanning a model in memory: a plain torch or transformers module, or a PEFT-wrapped one.

A PEFT model is scanned as its base weights (under the base model's own names: ``q_proj.weight``, not
``q_proj.base_layer.weight``) plus, for every LoRA module and adapter, ΔW = s·B·A from the factors (kind
``delta``) and W + ΔW (kind ``merged``) — the rows ``layerscope scan ADAPTER --base MODEL`` gives for the
same adapter saved to a folder.
"""

from __future__ import annotations

import re

import pandas as pd
import torch

from layerscope.adapters.spectra import updates_table
from layerscope.adapters.updates import Update
from layerscope.checkpoint.memory import MEMORY_FILE, checkpoint_of_module
from layerscope.errors import LayerscopeError
from layerscope.spectral.scan import ScanOptions, scan_checkpoint

LORA_PARAMETER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def scan_module(model: torch.nn.Module, opts: ScanOptions) -> pd.DataFrame:
    """The scan table of a model in memory (see the module docstring)."""
    if not is_peft_model(model):
        return scan_checkpoint(checkpoint_of_module(model), opts)
    base = model.get_base_model()
    checkpoint = checkpoint_of_module(base, f"<{type(base).__name__} + PEFT adapters in memory>", base_name)
    table = scan_checkpoint(checkpoint, opts)
    updates = peft_updates_in_memory(base)
    if not updates:
        return table
    adapters = updates_table(updates, checkpoint, opts.estimators, opts.progress)
    combined = pd.concat([table, adapters.reindex(columns=table.columns.union(adapters.columns, sort=False))],
                         ignore_index=True)
    combined.attrs.update(table.attrs, adapter="peft (in memory)")
    return combined


def base_name(name: str) -> str | None:
    """A PEFT-wrapped model's state-dict name → the base model's own name (None for the adapters' factors)."""
    if LORA_PARAMETER.search(name):
        return None
    return name.replace(".base_layer.", ".")


def peft_updates_in_memory(base: torch.nn.Module) -> list[Update]:
    """ΔW factors of every LoRA module and active adapter of a PEFT-wrapped base model."""
    updates = []
    for module_name, module in base.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(lora_b, torch.nn.ModuleDict):
            continue
        for adapter in lora_a:
            if getattr(module, "use_dora", {}).get(adapter):
                raise LayerscopeError(f"{module_name}: adapter {adapter!r} is DoRA, whose update is not s·B·A")
            a = lora_a[adapter].weight.detach().to(torch.float64)
            b = lora_b[adapter].weight.detach().to(torch.float64)
            updates.append(Update(module=module_name, expert=None, A=a, B=b, scaling=float(module.scaling[adapter]),
                                  tensor=f"{module_name}.lora_A.{adapter}.weight", file=MEMORY_FILE.name,
                                  dtype=str(lora_a[adapter].weight.dtype).removeprefix("torch.")))
    return updates
