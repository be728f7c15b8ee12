"""Save and load trained adapters (safetensors with the plan embedded), strictly; PEFT export."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from layerscope.errors import LayerscopeError
from layerscope.export.formats import to_peft_config
from layerscope.outputs import write_files
from layerscope.planning.plan import Plan
from layerscope.runtime.apply import adapters, apply_plan

ADAPTER_FILE = "adapter.safetensors"
PLAN_FILE = "plan.json"
PLAN_METADATA_KEY = "layerscope.plan"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable adapter tensor, keyed '<module>.<parameter>' (module names as in the model)."""
    state = {}
    for name, module in adapters(model).items():
        for param_name, param in module.named_parameters():
            if param.requires_grad:
                state[f"{name}.{param_name}"] = param.detach().contiguous().cpu()
    return state


def save_adapters(model: nn.Module, folder: str | Path) -> Path:
    """Write adapter.safetensors (the plan JSON in its metadata) and a readable plan.json."""
    folder = Path(folder)
    plan: Plan = model._layerscope["plan"]
    metadata = {"format": "pt", PLAN_METADATA_KEY: plan.to_json()}
    state = adapter_state(model)
    plan_text = plan.to_json()
    write_files({folder / ADAPTER_FILE: lambda tmp: save_file(state, str(tmp), metadata=metadata),
                 folder / PLAN_FILE: lambda tmp: tmp.write_text(plan_text, encoding="utf-8")})
    return folder


def load_adapters(model: nn.Module, folder: str | Path, verbose: bool = False) -> nn.Module:
    """Apply the embedded plan to a base model and load the adapter weights, strictly."""
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise LayerscopeError(f"{path}: no such adapter file")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if PLAN_METADATA_KEY not in metadata:
            raise LayerscopeError(f"{path}: no layerscope plan in the file's metadata")
        plan = Plan.loads(metadata[PLAN_METADATA_KEY], f"{path} (embedded plan)")
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    apply_plan(model, plan, verbose=verbose)
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        raise LayerscopeError(f"{path}: missing adapter tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise LayerscopeError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, tensor in stored.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LayerscopeError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the plan needs "
                                  f"{tuple(expected[key].shape)}")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in stored.items():
            parameters[key].copy_(tensor.to(parameters[key].dtype))
    return model


def export_peft_adapter(model: nn.Module, folder: str | Path) -> Path:
    """A plain-LoRA plan (one expert per module) as a PEFT adapter folder that PeftModel loads."""
    plan: Plan = model._layerscope["plan"]
    config = to_peft_config(plan)  # refuses mixtures and MoR
    state = {}
    for name, module in adapters(model).items():
        state[f"base_model.model.{name}.lora_A.weight"] = module.lora_A[0].detach().contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = module.lora_B[0].detach().contiguous().cpu()
    folder = Path(folder)
    text = json.dumps(config, indent=2) + "\n"
    write_files({folder / "adapter_config.json": lambda tmp: tmp.write_text(text),
                 folder / "adapter_model.safetensors": lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})})
    return folder
