"""Trainer-aware exports: axolotl YAML, MoE-PEFT (MixLoRA) JSON, vLLM-servable ranks, and the check
that a PEFT config's module keys name exactly the modules of the model they are meant for.

* axolotl: ``adapter: lora`` with ``lora_r``, ``lora_alpha``, ``lora_dropout``,
  ``lora_target_modules`` (full module paths) and ``lora_rank_pattern`` / ``lora_alpha_pattern``
  (escaped full paths, as in the PEFT export).  One expert per module only.
* MoE-PEFT MixLoRA (``routing_strategy: mixlora``): one ``r``, ``lora_alpha``, ``num_experts`` and
  ``top_k`` for the whole model, target modules by leaf name among the names MoE-PEFT knows (it
  ignores others silently).  MixLoRA puts experts in the feed-forward block only, so a mixture
  plan must target gate/up/down only; plans that are not uniform across layers are refused with
  the first difference.
* vLLM serves LoRA ranks 8, 16, 32, 64, 128, 256, 320 and 512: ``--round-ranks vllm`` rounds each
  rank up to the next of these (lora_alpha follows when the plan scales alpha with rank) and
  reports how the trainable parameter count changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from layerscope.errors import LayerscopeError
from layerscope.export.formats import _most_common, base_model
from layerscope.planning.accounting import planned_module_params
from layerscope.planning.plan import Plan

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
ROUNDINGS = {"vllm": VLLM_RANKS}
MOE_PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
MIXLORA_FFN = ("gate_proj", "up_proj", "down_proj")


def export_modules(plan: Plan, round_ranks: str | None = None) -> list[dict]:
    """The plan's modules, with ranks rounded up to a serving engine's set when asked."""
    modules = [dict(m) for m in plan.modules()]
    if round_ranks is None:
        return modules
    allowed = ROUNDINGS.get(round_ranks)
    if allowed is None:
        raise LayerscopeError(f"--round-ranks {round_ranks!r}: expected one of {', '.join(ROUNDINGS)}")
    alpha_scale = plan.document["lora"].get("alpha_scale")
    for module in modules:
        bigger = [r for r in allowed if r >= module["rank"]]
        if not bigger:
            raise LayerscopeError(f"{plan.source}: {module['name']} has rank {module['rank']}, above "
                                  f"{round_ranks}'s largest ({allowed[-1]})")
        module["rank"] = bigger[0]
        if alpha_scale is not None:
            module["lora_alpha"] = float(alpha_scale * module["rank"])
    return modules


def trainable_params(plan: Plan, modules: Iterable[dict]) -> int:
    return sum(planned_module_params(m, plan.document["expert_type"]).trainable_total for m in modules)


def rounding_report(plan: Plan, modules: list[dict], round_ranks: str) -> str:
    before, after = trainable_params(plan, plan.modules()), trainable_params(plan, modules)
    changed = sum(1 for old, new in zip(plan.modules(), modules) if old["rank"] != new["rank"])
    return (f"--round-ranks {round_ranks}: {changed} of {len(modules)} modules rounded up; trainable parameters "
            f"{before:,} -> {after:,} ({(after - before) / before:+.1%})")


# ---- PEFT key check ----------------------------------------------------------------------------

def check_peft_keys(config: dict, module_names: list[str], model: str, parameter_names: list[str] = ()) -> None:
    """Every rank/alpha pattern key, target module and target parameter must name exactly one module (or fused
    expert parameter) of the model (PEFT silently ignores a key that matches nothing, and a loose one adapts
    several)."""
    names = [*module_names, *parameter_names]
    for field, pool in (("target_modules", module_names), ("target_parameters", parameter_names)):
        for target in config.get(field) or []:
            hits = [name for name in pool if name == target or name.endswith("." + target)]
            if len(hits) != 1:
                raise LayerscopeError(f"PEFT {field} entry {target!r} matches {len(hits)} "
                                      f"{'modules' if field == 'target_modules' else 'expert parameters'} of {model} "
                                      "(expected exactly 1)")
    for field in ("rank_pattern", "alpha_pattern"):
        for key in config.get(field) or {}:
            pattern = re.compile(rf"(.*\.)?({key})$")
            hits = [name for name in names if pattern.match(name)]
            if len(hits) != 1:
                raise LayerscopeError(f"PEFT {field} key {key!r} matches {len(hits)} modules of {model} (expected "
                                      f"exactly 1{': ' + ', '.join(hits[:3]) if hits else ''})")


def checkpoint_parameter_names(path: str) -> list[str]:
    """The fused expert parameters of the model a checkpoint builds (``model.layers.0.mlp.experts.down_proj``)."""
    from layerscope.checkpoint.reader import open_checkpoint
    from layerscope.planning.inputs import expert_parameter_modules, header_rows

    rows, _, _ = header_rows(open_checkpoint(path))
    fused = expert_parameter_modules(rows)
    return sorted(fused["module"]) if not fused.empty else []


def checkpoint_module_names(path: str) -> list[str]:
    """Module names of the model a checkpoint builds: its weight tensors' live names without ``.weight``
    (as transformers renames them on load, so PEFT sees the same names)."""
    from layerscope.checkpoint.modeltree import live_names
    from layerscope.checkpoint.quantization import logical_tensors
    from layerscope.checkpoint.reader import open_checkpoint

    ckpt = open_checkpoint(path)
    stored = [t.name for t in logical_tensors(ckpt)]
    return [live.removesuffix(".weight") for live in live_names(ckpt.config, ckpt.path, stored).values()
            if live.endswith(".weight")]


# ---- axolotl -----------------------------------------------------------------------------------

def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _axolotl_base(plan: Plan, base: str | None) -> str:
    base = base or base_model(plan)
    if base is None:  # a GGUF file: axolotl loads transformers folders and hub ids
        return (f"# base_model: the model of {plan.model['path']}; convert it with `layerscope convert-gguf` and "
                "put the folder here")
    return f"base_model: {_yaml_scalar(base)}"


def to_axolotl_yaml(plan: Plan, modules: list[dict], base: str | None = None) -> str:
    if any(m["experts"] > 1 for m in modules):
        layer = next(m["layer"] for m in modules if m["experts"] > 1)
        raise LayerscopeError(f"{plan.source}: axolotl trains one LoRA per module, but layer {layer} has a mixture "
                              "(export --format mixlora for uniform mixtures, or use layerscope.runtime)")
    if plan.document["expert_type"] != "lora":
        raise LayerscopeError(f"{plan.source}: expert_type {plan.document['expert_type']!r} has no axolotl equivalent")

    lora = plan.document["lora"]
    lines = ["# written by layerscope from a plan; merge into your axolotl config",
             _axolotl_base(plan, base), "adapter: lora",
             f"lora_r: {_most_common([m['rank'] for m in modules])}",
             f"lora_alpha: {_yaml_scalar(_most_common([m['lora_alpha'] for m in modules]))}",
             f"lora_dropout: {_yaml_scalar(float(lora['dropout']))}",
             f"lora_fan_in_fan_out: {_yaml_scalar(bool(plan.model['conv1d']))}", "lora_target_modules:"]
    lines += [f"  - {_yaml_scalar(m['name'])}" for m in sorted(modules, key=lambda m: m["name"])]
    for field, key in (("lora_rank_pattern", "rank"), ("lora_alpha_pattern", "lora_alpha")):
        lines.append(f"{field}:")
        lines += [f"  {_yaml_scalar(re.escape(m['name']))}: {_yaml_scalar(m[key])}"
                  for m in sorted(modules, key=lambda m: m["name"])]
    return "\n".join(lines) + "\n"


# ---- MoE-PEFT MixLoRA --------------------------------------------------------------------------

def to_mixlora_config(plan: Plan, modules: list[dict], base: str | None = None) -> dict:
    if plan.document["expert_type"] != "lora":
        raise LayerscopeError(f"{plan.source}: MixLoRA experts are LoRA experts, not {plan.document['expert_type']}")
    planned = sorted({m["layer"] for m in modules})
    if planned != list(range(plan.model["num_layers"])):
        raise LayerscopeError(f"{plan.source}: MixLoRA adapts every layer the same way, but the plan covers layers "
                              f"{planned[:5]}{'...' if len(planned) > 5 else ''} of {plan.model['num_layers']}")
    first = modules[0]
    for field in ("experts", "top_k", "rank", "lora_alpha"):
        differing = next((m for m in modules if m[field] != first[field]), None)
        if differing is not None:
            raise LayerscopeError(f"{plan.source}: MixLoRA takes one {field} for the whole model, but "
                                  f"{differing['name']} has {differing[field]} and {first['name']} {first[field]} "
                                  "(plan with --strategy uniform, or use layerscope.runtime)")
    leaves = sorted({m["name"].rsplit(".", 1)[-1] for m in modules})
    unknown = [leaf for leaf in leaves if leaf not in MOE_PEFT_TARGETS]
    if unknown:
        raise LayerscopeError(f"{plan.source}: MoE-PEFT targets only {', '.join(MOE_PEFT_TARGETS)} and would "
                              f"silently skip {unknown[0]}")
    if first["experts"] > 1 and any(leaf not in MIXLORA_FFN for leaf in leaves):
        raise LayerscopeError(f"{plan.source}: MixLoRA puts experts in the feed-forward block only; the plan has "
                              f"experts on {', '.join(l for l in leaves if l not in MIXLORA_FFN)} (plan with "
                              "--target-roles gate,up,down)")
    if not float(first["lora_alpha"]).is_integer():
        raise LayerscopeError(f"{plan.source}: MoE-PEFT needs an integer lora_alpha, the plan has {first['lora_alpha']}")
    lora = plan.document["lora"]
    config = {
        "name": "layerscope_mixlora", "task_name": "casual", "base_model_name_or_path": base or base_model(plan),
        "task_type": "CAUSAL_LM", "peft_type": "MIXLORA" if first["experts"] > 1 else "LORA",
        "r": first["rank"], "lora_alpha": int(first["lora_alpha"]), "lora_dropout": float(lora["dropout"]),
        "lora_init": "gaussian" if lora["init"] == "gaussian" else "original",
        "target_modules": {leaf: leaf in leaves for leaf in MOE_PEFT_TARGETS},
    }
    if first["experts"] > 1:
        config.update(routing_strategy="mixlora", num_experts=first["experts"], top_k=first["top_k"],
                      router_aux_loss_coef=float(lora["router_aux_loss_coef"]), router_init_range=0.02,
                      jitter_noise=0.0)
    return config


def mixlora_json(plan: Plan, modules: list[dict], base: str | None = None) -> str:
    return json.dumps(to_mixlora_config(plan, modules, base), indent=2) + "\n"
