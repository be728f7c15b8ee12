"""A human-readable account of a plan: one row per layer, then totals and ratios."""

from __future__ import annotations

import pandas as pd

from layerscope.names import counted
from layerscope.planning.accounting import planned_module_params
from layerscope.planning.plan import Plan

_UNIT_NAMES = {"experts": "expert", "experts_per_layer": "expert in every layer", "rank": "rank unit"}


def _stack_of(plan: Plan) -> dict[int, str]:
    """layer → block stack name, from the plan's model facts (empty when the model has one unnamed stack)."""
    stacks, out, start = plan.model.get("stacks") or [], {}, 0
    if len(stacks) < 2:
        return out
    for stack in stacks:
        for offset in range(int(stack["depth"])):
            out[start + offset] = stack["name"]
        start += int(stack["depth"])
    return out


def _optimizer_columns(plan: Plan) -> dict[int, dict[str, float]]:
    """layer → the plan's optimizer multipliers (``lr_scale``, ``weight_decay_scale``); empty without --optimizer."""
    section = plan.document.get("optimizer") or {}
    return {int(row["layer"]): {k: v for k, v in row.items() if k.endswith("_scale")} for row in section.get("layers", [])}


def explain_table(plan: Plan) -> pd.DataFrame:
    """One row per planned layer.  ``v_i`` is the planner's layer value (the mean of the strategy's metric over
    the layer's planned modules), which is not the scan's per-layer table mean when that averages experts too."""
    rows = []
    stack_of = _stack_of(plan)
    multipliers = _optimizer_columns(plan)
    for layer in plan.layers:
        trainable = active = 0
        for m in layer["modules"]:
            if layer["experts"] > 0:
                counts = planned_module_params({**m, "experts": layer["experts"], "top_k": layer["top_k"]},
                                               plan.document["expert_type"])
                trainable, active = trainable + counts.trainable_total, active + counts.active_total
        ranks = sorted({m["rank"] for m in layer["modules"]})
        rows.append({"layer": layer["layer"], **({"stack": stack_of.get(layer["layer"], "")} if stack_of else {}),
                     "v_i": layer["metric"], "experts": layer["experts"],
                     "rank": "/".join(map(str, ranks)), "top_k": layer["top_k"],
                     "modules": len(layer["modules"]), "trainable": trainable, "active": active,
                     **multipliers.get(layer["layer"], {})})
    return pd.DataFrame(rows)


def oversized_adapters(plan: Plan) -> list[dict]:
    """Planned modules whose LoRA (one expert) has at least as many parameters as the matrix it adapts:
    r·(in + out) ≥ in·out, e.g. rank 8 on a 4 × 64 matrix (capped at full rank 4).  Low rank no longer holds."""
    return [m for m in plan.modules() if m["rank"] * (m["in_features"] + m["out_features"])
            >= m["in_features"] * m["out_features"]]


def oversized_line(plan: Plan, shown: int = 3) -> str | None:
    """One line naming the modules :func:`oversized_adapters` finds (None when there are none)."""
    found = oversized_adapters(plan)
    if not found:
        return None
    names = ", ".join(f"{m['name']} ({m['out_features']}x{m['in_features']}, rank {m['rank']})" for m in found[:shown])
    roles = sorted({m["role"] for m in found})
    return (f"note: {len(found)} module{'s' if len(found) > 1 else ''} get an adapter at least as large as the matrix "
            f"itself (rank x (in + out) >= in x out): {names}{' ...' if len(found) > shown else ''}; leave role(s) "
            f"{', '.join(roles)} out with --target-roles, or train those weights directly")


def explain_text(plan: Plan, label: str | None = None) -> str:
    """``label`` names the plan in the header (default: the strategy's name)."""
    model, strategy, acct = plan.model, plan.strategy, plan.accounting
    ratios, base = acct["ratios"], acct["baselines"]
    moe, single = base["uniform_moe"], base["single_lora"]
    header = (f"plan: {label or strategy['name']} on {model.get('architecture') or model['naming']} "
              f"({model.get('planned_depth', len(plan.layers))} of {model['num_layers']} layers planned)"
              + (f", metric {strategy['metric']}" if strategy.get("metric") else "")
              + f", {plan.document['expert_type']} experts")
    table = explain_table(plan)
    if table["v_i"].isna().all():
        table = table.drop(columns="v_i")
    lines = [header, table.to_string(index=False, float_format="%.3f")]
    t, a = acct["trainable"], acct["active_per_token"]
    lines.append(f"trainable: {t['adapters']:,} adapter + {t['routers']:,} router = {t['total']:,} params; "
                 f"adapters {ratios['trainable_adapters_vs_uniform_moe']:.3f}x uniform {counted(moe['experts'], 'expert')} "
                 f"at rank {moe['rank']}, {ratios['trainable_adapters_vs_single_lora']:.3f}x one rank-{single['rank']} LoRA")
    lines.append(f"active per token: {a['adapters']:,} adapter + {a['routers']:,} router = {a['total']:,} params; "
                 f"adapters {ratios['active_adapters_vs_single_lora']:.3f}x one rank-{single['rank']} LoRA, "
                 f"{ratios['active_adapters_vs_uniform_moe']:.3f}x uniform top-{moe['top_k']}")
    optimizer = plan.document.get("optimizer")
    if optimizer:
        ranges = ", ".join(f"{method} {lo:g}–{hi:g}×" for method, (lo, hi) in optimizer["ranges"].items())
        lines.append(f"optimizer multipliers from {optimizer['metric']} per layer: {ranges} "
                     "(lr_scale × your learning rate, weight_decay_scale × your weight decay)")
    oversized = oversized_line(plan)
    if oversized:
        lines.append(oversized)
    budget = strategy.get("budget")
    if budget:
        lines.append(f"budget: {budget['params']:,} params ({budget['source']}); used {budget['used']:,}, "
                     f"slack {budget['slack']:,} (no further {_UNIT_NAMES.get(budget['unit'], budget['unit'])} fits)")
    return "\n".join(lines)
