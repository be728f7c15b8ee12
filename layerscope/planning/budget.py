"""Fit a strategy's allocation to a parameter budget, exactly and without exceeding it.

1. Find the largest value of the strategy's knob (total experts, or base rank) whose
   allocation fits: trainable parameters (adapters + routers) <= budget.
2. Top up one unit at a time (an expert, or +1 rank in a layer) to the layer furthest below
   its proportional share, while any unit still fits.  When this stops, no further unit fits:
   the slack is smaller than the cheapest unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerscope.errors import LayerscopeError
from layerscope.planning.accounting import account
from layerscope.planning.inputs import PlanInputs
from layerscope.planning.strategies import LayerAllocation, StrategyResult, with_top_up

_SCALE_CAP = 1 << 24


@dataclass(frozen=True)
class BudgetFit:
    allocations: list[LayerAllocation]
    budget: int
    used: int
    scale_value: int
    top_ups: int

    @property
    def slack(self) -> int:
        return self.budget - self.used


def fit_budget(inputs: PlanInputs, result: StrategyResult, budget: int) -> BudgetFit:
    if budget <= 0:
        raise LayerscopeError(f"budget {budget}: must be a positive number of parameters")
    scale = result.scale

    def cost_at(value: int) -> int | None:
        if scale.keeps_shape is not None and not scale.keeps_shape(value):
            return None
        try:
            allocations = scale.allocate(value)
        except LayerscopeError:  # e.g. more experts than the per-layer maximums allow
            return None
        if not ranks_fit(inputs, allocations):
            return None
        return account(inputs, allocations).trainable_total

    smallest = cost_at(scale.minimum)
    if smallest is None or smallest > budget:
        raise LayerscopeError(
            f"budget of {budget:,} parameters cannot be met: the smallest {result.name} allocation "
            f"({scale.unit} = {scale.minimum}) needs {smallest:,}" if smallest is not None else
            f"budget of {budget:,} parameters cannot be met by {result.name}"
        )
    best = _largest_fitting(scale.minimum, budget, cost_at)
    allocations = scale.allocate(best)
    # Top-ups fill the slack below one more knob step; where that step would break the shape (an explicit cap),
    # they would pile units onto layers until the profile flattens, so the slack stays.
    shape_ends = scale.keeps_shape is not None and not scale.keeps_shape(best + 1)
    allocations, top_ups = (_top_up(inputs, allocations, result, budget) if scale.top_up and not shape_ends
                            else (allocations, 0))
    return BudgetFit(allocations, budget, account(inputs, allocations).trainable_total, best, top_ups)


def ranks_fit(inputs: PlanInputs, allocations: list[LayerAllocation]) -> bool:
    """No module gets a rank above its matrix's smaller dimension."""
    shapes = inputs.shapes_by_layer
    return all(a.rank_of(role) <= min(in_f, out_f) for a in allocations for role, in_f, out_f, _ in shapes[a.layer])


def fitted_params(result: StrategyResult, fit: BudgetFit) -> dict:
    """The strategy's options as the fitted plan uses them (``total_experts: 160`` would be wrong when 22 are used)."""
    params = dict(result.params)
    if result.scale.param:
        params[result.scale.param] = (sum(a.experts for a in fit.allocations) if result.scale.unit == "experts"
                                      else fit.scale_value)
    if result.scale.unit == "rank" and params.get("max_rank", "unset") is None:
        params["max_rank"] = 2 * fit.scale_value  # adaptive-lora's default cap at the fitted base rank
    return params


def _largest_fitting(low: int, budget: int, cost_at) -> int:
    """Largest knob value whose cost fits (costs grow with the knob; exponential then binary search)."""
    high = low
    while high < _SCALE_CAP:
        cost = cost_at(high * 2)
        if cost is None or cost > budget:
            break
        high *= 2
    lo, hi = high, min(high * 2, _SCALE_CAP)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cost = cost_at(mid)
        if cost is not None and cost <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _top_up(inputs: PlanInputs, allocations: list[LayerAllocation], result: StrategyResult,
            budget: int) -> tuple[list[LayerAllocation], int]:
    unit, weights = result.scale.unit, result.scale.weights
    cap = result.params.get("max_experts") if unit == "experts" else result.params.get("max_rank")
    top_k = int(result.params.get("top_k", 1))
    allocations = list(allocations)
    used = account(inputs, allocations).trainable_total
    layer_cost = {a.layer: account(inputs, [a]).trainable_total for a in allocations}
    steps = 0
    while True:
        units = [a.experts if unit == "experts" else a.rank for a in allocations]
        total_after = sum(units) + 1
        best = None
        for i, alloc in enumerate(allocations):
            if cap is not None and units[i] >= cap:
                continue
            trial = with_top_up(alloc, unit, top_k)
            if not ranks_fit(inputs, [trial]):
                continue
            trial_cost = account(inputs, [trial]).trainable_total
            if used - layer_cost[alloc.layer] + trial_cost > budget:
                continue
            deficit = weights[i] / sum(weights) * total_after - units[i]
            if best is None or deficit > best[0]:
                best = (deficit, i, trial, trial_cost)
        if best is None:
            return allocations, steps
        _, i, trial, trial_cost = best
        used += trial_cost - layer_cost[trial.layer]
        layer_cost[trial.layer] = trial_cost
        allocations[i] = trial
        steps += 1
