"""Budget curves: every strategy and its like-for-like baseline fitted at several trainable-parameter budgets.

A budget is a ratio of the reference budget (``--budget-params``, else MoLA □ at the depth-scaled default:
5 rank-8 experts per layer, top-2, on the target roles) or, at ``RATIO_LIMIT`` and above, a number of
trainable parameters.  At each budget every strategy keeps its shape, as ``--budget-params`` does:

* expert-count strategies (alphalora, mola, sensitivity by experts) scale their expert rank with the budget
  (rank = max(1, round(8 × ratio)), unless ``--option STRATEGY.rank=`` fixes it) and fit their total
  experts to it, so their profile of experts per layer is the same at every budget;
* rank strategies (hilo, adaptive-lora, sensitivity by ranks) fit their own knob (hilo's experts per
  layer, the base rank);
* ``adalora`` and ``dense`` take the budget itself.

A strategy that cannot be fitted at a budget (hilo's rank tiers need at least one expert per layer) is left
out at that budget with the reason, not silently replaced.  Arms are named ``NAME@LABEL`` (``alphalora@0.25x``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from layerscope.errors import LayerscopeError
from layerscope.experiments.arms import ADALORA, DENSE, Arm, PlanSettings, build_arms
from layerscope.planning import plan
from layerscope.planning.strategies import EXPERTS_PER_LAYER

RATIO_LIMIT = 1000  # a budget below this is a ratio of the reference budget; at or above, trainable parameters
REFERENCE_RANK = 8
EXPERT_COUNT_STRATEGIES = ("alphalora", "mola", "sensitivity")


@dataclass(frozen=True)
class Budget:
    label: str  # "0.25x"
    ratio: float  # of the reference budget
    params: int  # trainable parameters (adapters + routers)

    def as_dict(self) -> dict:
        return {"label": self.label, "ratio": self.ratio, "params": self.params}


def reference_budget(model: str, settings: PlanSettings) -> tuple[int, str]:
    """``--budget-params``, else MoLA □ at 5 rank-8 experts per layer, top-2, on the comparison's roles."""
    if settings.budget_params is not None:
        return int(settings.budget_params), "--budget-params"
    depth = len(plan(model, "uniform", target_roles=settings.target_roles, progress=False).layers)
    square = plan(model, "mola", shape="□", total_experts=EXPERTS_PER_LAYER * depth, rank=REFERENCE_RANK, top_k=2,
                  target_roles=settings.target_roles, expert_type=settings.expert_type, progress=False,
                  command="compare-plans: reference budget")
    return int(square.accounting["trainable"]["total"]), (f"MoLA □: {EXPERTS_PER_LAYER} rank-{REFERENCE_RANK} experts "
                                                          "per layer, top-2")


def resolve(values: list[float], reference: int) -> list[Budget]:
    """Ratios (below RATIO_LIMIT) or parameter counts → budgets, smallest first; refuses repeats and non-positives."""
    if not values:
        raise LayerscopeError("--budgets: give one or more ratios of the default budget (e.g. 0.25,1,4) or "
                              "trainable-parameter counts")
    budgets = []
    for value in values:
        if not (math.isfinite(value) and value > 0):
            raise LayerscopeError(f"--budgets {value:g}: every budget must be a finite number > 0")
        ratio = value if value < RATIO_LIMIT else value / reference
        params = round(value * reference) if value < RATIO_LIMIT else int(value)
        budgets.append(Budget(f"{ratio:.3g}x", ratio, params))
    labels = [b.label for b in budgets]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated:
        raise LayerscopeError(f"--budgets: {repeated} of the default budget ({reference:,} parameters) is given twice")
    return sorted(budgets, key=lambda b: b.params)


def settings_at(settings: PlanSettings, budget: Budget, items: list[str]) -> PlanSettings:
    """The plan settings at ``budget``: its parameters, and the expert rank scaled for expert-count strategies."""
    options = {name: dict(values) for name, values in settings.options.items()}
    for strategy in EXPERT_COUNT_STRATEGIES:
        chosen = options.get(strategy, {})
        if strategy not in items or "rank" in chosen or chosen.get("unit", "experts") != "experts":
            continue
        options.setdefault(strategy, {})["rank"] = max(1, round(REFERENCE_RANK * budget.ratio))
    return replace(settings, options=options, budget_params=budget.params,
                   peft_rank_arms=settings.peft_rank_arms or ADALORA in items)


def arms_at_budgets(model: str, items: list[str], settings: PlanSettings,
                    budgets: list[Budget]) -> tuple[list[Arm], list[dict]]:
    """Every budget's arms (renamed ``NAME@LABEL``), and what could not be fitted where, with the reason."""
    arms: list[Arm] = []
    left_out: list[dict] = []
    for budget in budgets:
        at = settings_at(settings, budget, items)
        kept = list(items)
        try:
            group = build_arms(model, kept, at)
        except LayerscopeError:
            kept, reasons = _fitting(model, items, at)
            left_out.extend({"budget": budget.label, "params": budget.params, "arm": name, "why": why}
                            for name, why in reasons)
            if not any(item not in (DENSE,) for item in kept):
                continue
            group = build_arms(model, kept, at)
        arms.extend(_labelled(group, budget))
    if not arms:
        reasons = "; ".join(f"{n['arm']} at {n['budget']}: {n['why']}" for n in left_out[:3])
        raise LayerscopeError(f"--budgets: no strategy could be fitted at any budget ({reasons})")
    return arms, left_out


def _fitting(model: str, items: list[str], settings: PlanSettings) -> tuple[list[str], list[tuple[str, str]]]:
    kept, reasons = [], []
    for item in items:
        if item == DENSE:
            continue
        try:
            build_arms(model, [item], settings)
            kept.append(item)
        except LayerscopeError as exc:
            reasons.append((item, str(exc)))
    if kept and DENSE in items:
        try:
            build_arms(model, [*kept, DENSE], settings)
            kept.append(DENSE)
        except LayerscopeError as exc:
            reasons.append((DENSE, str(exc)))
    return kept, reasons


def _labelled(group: list[Arm], budget: Budget) -> list[Arm]:
    def name(old: str | None) -> str | None:
        return None if old is None else f"{old}@{budget.label}"

    for arm in group:
        arm.strategy_name = arm.name if arm.kind in ("strategy", "dense") or arm.name == ADALORA else None
        arm.name, arm.baseline = name(arm.name), name(arm.baseline)
        arm.compared = [name(other) for other in arm.compared]
        arm.budget = budget.label
    return group
