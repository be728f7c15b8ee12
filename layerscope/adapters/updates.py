"""Adapter folders read as updates ΔW = s·B·A per module (and expert): PEFT LoRA folders and ours.

* a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``):
  s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern``
  keys are matched against module names as PEFT matches them (the key is a suffix of the module
  name at a dot boundary), and the stored factors' rank must agree with the config.
* a layerscope MoE-LoRA adapter folder (``adapter.safetensors`` from ``save_adapters``): one update per
  module and expert, ΔW_e = (lora_alpha / r)·B_e·A_e; MoR experts ΔW_e = s·diag(λ_B,e)·B·diag(λ_A,e)·A.
"""


from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from layerscope.checkpoint.modeltree import live_names
from layerscope.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint, read_tensor
from layerscope.errors import LayerscopeError
from layerscope.strictjson import strict_json

PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
OURS = "adapter.safetensors"
ADAPTER_COLUMNS = ["lora_rank", "lora_scaling"]


@dataclass
class Update:
    """One adapter update: the module it changes and ΔW's factors (ΔW = scaling · B · A)."""

    module: str
    expert: int | None
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float
    tensor: str  # the stored tensor the row points at
    file: str
    dtype: str  # stored dtype of the factors


def adapter_kind(path: Path) -> str | None:
    """"peft", "layerscope" or None (not an adapter folder)."""
    if not path.is_dir():
        return None
    if (path / PEFT_CONFIG).is_file():
        return "peft"
    if (path / OURS).is_file():
        return "layerscope"
    return None


def delta_eigenvalues(A: torch.Tensor, B: torch.Tensor, scaling: float) -> np.ndarray:
    """The nonzero eigenvalues of ΔWᵀΔW for ΔW = scaling·B·A, ascending, in float64, from the r×r core."""
    _, r_a = torch.linalg.qr(A.to(torch.float64).T)  # Aᵀ = Q_A R_A
    _, r_b = torch.linalg.qr(B.to(torch.float64))  # B = Q_B R_B
    core = scaling * (r_b @ r_a.T)
    singular = torch.linalg.svdvals(core)
    return np.sort((singular * singular).numpy())


# ---- reading the two adapter formats -----------------------------------------------------------

def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern key that matches the module name as ``(.*\\.)?key$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_updates(folder: Path) -> list[Update]:
    config = strict_json((folder / PEFT_CONFIG).read_bytes(), str(folder / PEFT_CONFIG))
    if not isinstance(config, dict):
        raise LayerscopeError(f"{folder / PEFT_CONFIG}: expected a JSON object")
    where = folder / PEFT_CONFIG
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LayerscopeError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA (only LoRA updates are "
                              "analysed)")
    if config.get("use_dora"):
        raise LayerscopeError(f"{where}: use_dora is set; DoRA's update is not s·B·A and is not analysed")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    patterns = {key: config.get(key) or {} for key in ("rank_pattern", "alpha_pattern")}
    for key, value in (("r", rank), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise LayerscopeError(f"{where}: field {key!r} is {value!r}, expected a positive number")
    for key, pattern in patterns.items():
        if not isinstance(pattern, dict):
            raise LayerscopeError(f"{where}: field {key!r} is not an object")
    ckpt = open_checkpoint(folder)
    factors: dict[str, dict[str, TensorInfo]] = {}
    for name, info in ckpt.tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if match:
            factors.setdefault(match.group(1), {})[match.group(2)] = info
        elif ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
            raise LayerscopeError(f"{ckpt.path}: tensor {name!r}: embedding LoRA and DoRA updates are not analysed")
    if not factors:
        raise LayerscopeError(f"{ckpt.path}: no lora_A / lora_B weights in this adapter")
    updates = []
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise LayerscopeError(f"{ckpt.path}: module {module!r} has no {missing} weight")
        A, B = read_tensor(pair["A"]), read_tensor(pair["B"])
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise LayerscopeError(f"{ckpt.path}: module {module!r}: lora_A {list(A.shape)} and lora_B "
                                  f"{list(B.shape)} are not (r, in) and (out, r)")
        r = _pattern_value(patterns["rank_pattern"], module, rank)
        if r != A.shape[0]:
            raise LayerscopeError(f"{where}: module {module!r} has rank {A.shape[0]} in the weights but {r} in the "
                                  "config (r / rank_pattern)")
        module_alpha = _pattern_value(patterns["alpha_pattern"], module, alpha)
        scaling = module_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        updates.append(Update(module, None, A, B, float(scaling), pair["B"].name, pair["B"].file.name,
                              pair["B"].dtype))
    return updates


def layerscope_updates(folder: Path) -> list[Update]:
    from layerscope.planning.plan import Plan

    ckpt = open_checkpoint(folder / OURS)
    plan_file = folder / "plan.json"
    if not plan_file.is_file():
        raise LayerscopeError(f"{folder}: {OURS} without its plan.json (written together by save_adapters)")
    plan = Plan.load(plan_file)
    specs = {spec["name"]: spec for spec in plan.modules()}
    updates = []
    modules = sorted({name.rsplit(".", 1)[0] for name in ckpt.tensors if name.endswith(".lora_A")})
    for module in modules:
        spec = _spec_for(specs, module, folder)
        scaling = spec["lora_alpha"] / spec["rank"]
        A, B = ckpt.load(f"{module}.lora_A", torch.float64), ckpt.load(f"{module}.lora_B", torch.float64)
        tensor, file = f"{module}.lora_B", (folder / OURS).name
        stored = ckpt.tensors[tensor].dtype
        if plan.document["expert_type"] == "mor":
            lam_a, lam_b = ckpt.load(f"{module}.lambda_A", torch.float64), ckpt.load(f"{module}.lambda_B", torch.float64)
            for j in range(lam_a.shape[0]):
                updates.append(Update(module, j, lam_a[j][:, None] * A, lam_b[j][:, None] * B, scaling, tensor, file,
                                      stored))
        else:
            for j in range(A.shape[0]):
                updates.append(Update(module, j, A[j], B[j], scaling, tensor, file, stored))
    if not updates:
        raise LayerscopeError(f"{folder / OURS}: no lora_A tensors")
    return updates


def _spec_for(specs: dict, module: str, folder: Path) -> dict:
    if module in specs:
        return specs[module]
    for name, spec in specs.items():
        if name.endswith("." + module) or module.endswith("." + name):
            return spec
    raise LayerscopeError(f"{folder / OURS}: module {module!r} is not in the embedded plan")


# ---- the table ---------------------------------------------------------------------------------

def explicit_delta(update: Update, weight_shape: tuple[int, ...], where: str) -> torch.Tensor:
    """s·B·A in float64, oriented like the base weight it is added to (a Conv1D base stores (in, out))."""
    delta = update.scaling * (update.B.to(torch.float64) @ update.A.to(torch.float64))
    if weight_shape == tuple(delta.shape[::-1]) and weight_shape[0] != weight_shape[1]:
        delta = delta.T
    if weight_shape != tuple(delta.shape):
        raise LayerscopeError(f"{where} is {list(weight_shape)} but the adapter's update of {update.module!r} is "
                              f"{list(delta.shape)}")
    return delta


def _live_names_of(base: Checkpoint) -> dict[str, str]:
    """stored → live name of every tensor, computed once per checkpoint (merge asks for every adapted module)."""
    cached = getattr(base, "_live_names", None)
    if cached is None:
        cached = live_names(base.config, base.path, list(base.tensors))
        base._live_names = cached
    return cached


def base_tensor(base: Checkpoint, module: str) -> str:
    """The stored base weight of an adapted module (named as the live model names it): the tensor whose
    live name is the module's weight, else the same stored name, else the one name that ends with it."""
    wanted = f"{module}.weight"
    by_live = [stored for stored, live in _live_names_of(base).items() if live == wanted or live.endswith("." + wanted)]
    if len(by_live) == 1:
        return by_live[0]
    if wanted in base.tensors:
        return wanted
    candidates = [n for n in base.tensors if n.endswith("." + wanted) or wanted.endswith("." + n)]
    if len(candidates) != 1:
        raise LayerscopeError(f"{base.path}: no single base weight for adapted module {module!r} "
                              + ("(no candidate)" if not candidates else f"({len(candidates)} candidates: "
                                 f"{', '.join(candidates[:3])})"))
    return candidates[0]
