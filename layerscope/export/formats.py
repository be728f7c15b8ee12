"""Plan → PEFT ``LoraConfig`` JSON, MoLA/AlphaLoRA command-line arguments, or a flat table."""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from functools import cache
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.planning.accounting import planned_module_params
from layerscope.planning.plan import Plan


def _most_common(values):
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def base_model(plan: Plan, check_model: str | Path | None = None) -> str | None:
    """Where a trainer loads the plan's base model from: the plan's checkpoint, except a GGUF file, which
    transformers loads only with ``gguf_file=`` (PEFT and the trainers have no field for it): then the folder
    ``convert-gguf`` wrote from it when the export is checked against that folder, else none."""
    path = str(plan.model["path"])
    if not path.lower().endswith(".gguf"):
        return path
    from layerscope.checkpoint.gguf import converted_from

    if check_model is not None and Path(check_model).is_dir() and converted_from(check_model) is not None:
        return str(Path(check_model).resolve())
    return None


def to_peft_config(plan: Plan, base_model_name_or_path: str | None = None, modules: list[dict] | None = None) -> dict:
    """A LoraConfig-compatible dict; every planned module is named in rank/alpha patterns.

    Pattern keys are escaped full module paths (``model\\.layers\\.3\\.self_attn\\.q_proj``):
    PEFT matches them as ``(.*\\.)?(key)$``, so ``layers.1`` can never match ``layers.11``.  A model's fused
    expert MLPs (``model.layers.3.mlp.experts.gate_up_proj``) go in ``target_parameters``; PEFT keys their
    patterns by the same full path and trains one LoRA per expert, without dropout.
    """
    if plan.document["expert_type"] != "lora":
        raise LayerscopeError(f"{plan.source}: expert_type {plan.document['expert_type']!r} has no PEFT equivalent; "
                              "train it with layerscope.runtime")
    crowded = [layer for layer in plan.layers if layer["experts"] > 1]
    if crowded:
        first = crowded[0]
        raise LayerscopeError(
            f"{plan.source}: PEFT has no per-layer mixture of experts, but layer {first['layer']} has "
            f"{first['experts']} experts (export --format mola, or use layerscope.runtime)"
        )
    modules = plan.modules() if modules is None else modules
    if not modules:
        raise LayerscopeError(f"{plan.source}: no module has an adapter")
    linears = [m for m in modules if "model_experts" not in m]
    parameters = [m for m in modules if "model_experts" in m]
    _check_peft_moe_renames(plan, linears)
    _check_peft_mamba(plan, linears)
    lora = plan.document["lora"]
    if parameters and lora["dropout"]:
        raise LayerscopeError(f"{plan.source}: lora.dropout is {lora['dropout']}, but PEFT adapts fused expert "
                              f"parameters ({parameters[0]['name']}) without dropout; plan with --dropout 0")
    config = {
        "peft_type": "LORA",
        "task_type": plan.model.get("task"),
        "base_model_name_or_path": base_model_name_or_path or base_model(plan),
        "r": _most_common([m["rank"] for m in modules]),
        "lora_alpha": _most_common([m["lora_alpha"] for m in modules]),
        "lora_dropout": lora["dropout"],
        "target_modules": sorted(m["name"] for m in linears),
        "rank_pattern": {re.escape(m["name"]): m["rank"] for m in modules},
        "alpha_pattern": {re.escape(m["name"]): m["lora_alpha"] for m in modules},
        "fan_in_fan_out": plan.model["conv1d"],
        "bias": "none",
        "init_lora_weights": "gaussian" if lora["init"] == "gaussian" else True,
        "inference_mode": False,
    }
    if parameters:  # PEFT >= 0.17: one LoRA per expert of each named 3-D parameter; same pattern keys
        config["target_parameters"] = sorted(m["name"] for m in parameters)
    return config


def _peft_moe_renames(model_type: str | None) -> set[str]:
    """Leaf names PEFT's transformers-v5 MoE conversion rewrites for this model type (empty if none).

    Read from the two tables' source (PEFT's ``_MOE_TARGET_MODULE_MAPPING``, transformers'
    ``_MODEL_TO_CONVERSION_PATTERN``) rather than by importing them: importing PEFT costs seconds and
    drags in bitsandbytes, and an export needs neither."""
    patterns = _source_literal("transformers", "conversion_mapping.py", "_MODEL_TO_CONVERSION_PATTERN") or {}
    mapping = _source_literal("peft", "utils/transformers_weight_conversion.py", "_MOE_TARGET_MODULE_MAPPING")
    if not mapping:
        return set()
    patterns = {**patterns, "mixtral": "mixtral"}  # PEFT adds mixtral to transformers' table
    pattern = patterns.get(model_type)
    return set(mapping.get(pattern, {})) if pattern else set()


@cache
def _source_literal(package: str, relative: str, name: str):
    """A module-level literal assignment in an installed package's source, without importing the package."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        return None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


# PEFT (0.21, tuners_utils._check_lora_target_modules_mamba) refuses LoRA on these module leaf names in
# these model types: their fused Mamba kernels bypass the Linear's forward.
PEFT_MAMBA_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
PEFT_MAMBA_REFUSED = frozenset({"out_proj", "conv1d"})


def peft_refused(plan: Plan, modules: list[dict]) -> list[str]:
    """Planned modules that PEFT would refuse or retarget for this model type (see the two checks below)."""
    model_type = plan.model.get("model_type")
    refused = PEFT_MAMBA_REFUSED if model_type in PEFT_MAMBA_TYPES else set()
    renamed = _peft_moe_renames(model_type)
    return sorted(m["name"] for m in modules if m["name"].rsplit(".", 1)[-1] in refused | renamed)


def _check_peft_mamba(plan: Plan, modules: list[dict]) -> None:
    if plan.model.get("model_type") not in PEFT_MAMBA_TYPES:
        return
    refused = sorted({m["role"] for m in modules if m["name"].rsplit(".", 1)[-1] in PEFT_MAMBA_REFUSED})
    if refused:
        raise LayerscopeError(
            f"{plan.source}: PEFT refuses LoRA on {'/'.join(sorted(PEFT_MAMBA_REFUSED))} modules of "
            f"{plan.model.get('model_type')} models (its fused Mamba kernels skip them); plan without role(s) "
            f"{', '.join(refused)} (--target-roles) or train with layerscope.runtime")


def _check_peft_moe_renames(plan: Plan, modules: list[dict]) -> None:
    """PEFT rewrites targets ending in an expert projection's old name (``gate_proj``, ``w1``, ...) into the
    fused expert parameters of MoE models, even when the target is a dense or shared-expert MLP; such a
    config would silently adapt other weights than planned."""
    renamed = _peft_moe_renames(plan.model.get("model_type"))
    clashing = sorted(m["name"] for m in modules if m["name"].rsplit(".", 1)[-1] in renamed)
    if clashing:
        raise LayerscopeError(
            f"{plan.source}: PEFT converts targets ending in {'/'.join(sorted(renamed))} of "
            f"{plan.model.get('model_type')} models into fused expert parameters, so {clashing[0]} (and "
            f"{len(clashing) - 1} more) cannot be targeted by name; plan attention roles only (--target-roles) "
            "or train with layerscope.runtime"
        )


def to_mola_args(plan: Plan) -> dict[str, str]:
    """MoLA / AlphaLoRA trainer arguments: one comma-separated entry per layer, layers 0..L-1."""
    if plan.document["expert_type"] != "lora":
        raise LayerscopeError(f"{plan.source}: expert_type {plan.document['expert_type']!r}: MoLA trains LoRA experts "
                              "(its own A and B per expert), not this plan's experts; train it with layerscope.runtime")
    layers = sorted(plan.layers, key=lambda layer: layer["layer"])
    expected = list(range(plan.model["num_layers"]))
    if [layer["layer"] for layer in layers] != expected:
        raise LayerscopeError(f"{plan.source}: MoLA needs every layer 0..{expected[-1]} planned")
    for layer in layers:
        if layer["experts"] < 1:
            raise LayerscopeError(f"{plan.source}: layer {layer['layer']} has 0 experts; MoLA needs at least 1")
        if len({m["rank"] for m in layer["modules"]}) > 1:
            raise LayerscopeError(f"{plan.source}: layer {layer['layer']} has per-module ranks; MoLA takes one per layer")
    alphas = {m["lora_alpha"] for layer in layers for m in layer["modules"]}
    if len(alphas) > 1:
        raise LayerscopeError(f"{plan.source}: lora_alpha differs across layers {sorted(alphas)}; MoLA takes one "
                              "value (plan with --lora-alpha N)")
    suffixes = mola_target_suffixes(plan)
    alpha = alphas.pop()
    return {
        "number_experts": ",".join(str(layer["experts"]) for layer in layers),
        "top_k": ",".join(str(layer["top_k"]) for layer in layers),
        "lora_r": ",".join(str(layer["modules"][0]["rank"]) for layer in layers),
        "lora_alpha": str(int(alpha) if float(alpha).is_integer() else alpha),
        "lora_dropout": str(plan.document["lora"]["dropout"]),
        "lora_target_modules": ",".join(suffixes),
    }


def block_relative(name: str, layer: int) -> str:
    """A module's path inside its block: ``bert.encoder.layer.3.attention.output.dense`` → ``attention.output.dense``."""
    match = re.search(rf"(?:^|\.){layer}\.(.+)$", name)
    if match is None:
        raise LayerscopeError(f"{name}: no block index {layer} in the module name")
    return match.group(1)


def mola_target_suffixes(plan: Plan) -> list[str]:
    """MoLA's ``lora_target_modules``: each planned module's path inside its block.  The trainer adapts every
    module whose name ends in one, so a bare leaf (``dense``) would also adapt BERT's ``pooler.dense`` and
    every other unplanned ``dense``; the block path names only the planned ones."""
    return sorted({block_relative(m["name"], layer["layer"]) for layer in plan.layers for m in layer["modules"]})


def unplanned_suffix_matches(plan: Plan, suffixes: list[str], module_names: list[str]) -> list[str]:
    """Modules of the model that a suffix target would adapt although the plan does not name them."""
    planned = {m["name"] for m in plan.modules()}
    return sorted(name for name in module_names if name not in planned
                  and any(name == s or name.endswith("." + s) for s in suffixes))


def mola_command_line(args: dict[str, str]) -> str:
    return " ".join(f"--{key} {shlex.quote(value) if ',' not in value else json.dumps(value)}"
                    for key, value in args.items())


def to_table(plan: Plan, modules: list[dict] | None = None) -> pd.DataFrame:
    """One row per planned module, with its parameter counts."""
    rows = []
    for m in plan.modules() if modules is None else modules:
        counts = planned_module_params(m, plan.document["expert_type"])
        rows.append({"layer": m["layer"], "module": m["name"], "role": m["role"], "experts": m["experts"],
                     "rank": m["rank"], "top_k": m["top_k"], "lora_alpha": m["lora_alpha"],
                     "in_features": m["in_features"], "out_features": m["out_features"],
                     "model_experts": m.get("model_experts"),
                     "trainable": counts.trainable_total, "active_per_token": counts.active_total})
    return pd.DataFrame(rows)
