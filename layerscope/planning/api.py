"""``layerscope.plan``: from a model or scan table to a validated allocation plan."""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.planning.accounting import baselines
from layerscope.planning.budget import fit_budget, fitted_params
from layerscope.planning.inputs import load_inputs
from layerscope.planning.optimizer import DEFAULT_METRIC as DEFAULT_OPTIMIZER_METRIC
from layerscope.planning.optimizer import optimizer_section
from layerscope.planning.plan import EXPERT_TYPES, LoraSettings, Plan, build_plan
from layerscope.planning.registry import STRATEGIES
from layerscope.planning.strategies import StrategyResult, check_options


def plan(source, strategy: str = "alphalora", *, budget_params: int | None = None,
         budget_ratio: float | None = None, target_roles: list[str] | None = None, expert_type: str = "lora",
         lora: LoraSettings | None = None, reference_rank: int = 8, reference_experts: int = 8,
         command: str | None = None, progress: bool = True, optimizer: list[str] | None = None,
         optimizer_metric: str = DEFAULT_OPTIMIZER_METRIC, include_towers: bool = False,
         allow_unmapped: bool = False, **strategy_params) -> Plan:
    """Allocate experts, ranks and top-k per layer.

    ``source``: a checkpoint folder/file (scanned only when the strategy needs a metric), a
    scan table file, or a scan DataFrame.  ``strategy_params`` go to the strategy function
    (see :mod:`layerscope.planning.strategies`).  With ``budget_params`` (trainable parameters,
    adapters + routers) or ``budget_ratio`` (× one rank-``reference_rank`` LoRA on every target
    module) the allocation is rescaled to the largest that fits; the plan records the slack.
    ``optimizer`` (``tempbalance``, ``alphadecay``) adds per-layer learning-rate / weight-decay
    multipliers from ``optimizer_metric`` (see :mod:`layerscope.planning.optimizer`).
    Plans cover the language model; ``include_towers`` adds the vision/audio towers' blocks.  A model
    with block Linear layers of no known role is refused unless ``allow_unmapped``.
    """
    if strategy not in STRATEGIES:
        raise LayerscopeError(f"--strategy {strategy!r}: unknown (known: {', '.join(STRATEGIES)})")
    if budget_params is not None and budget_ratio is not None:
        raise LayerscopeError("give --budget-params or --budget-ratio, not both")
    _refuse_size_conflict(strategy, strategy_params, budget_params, budget_ratio)
    function = STRATEGIES[strategy]
    accepted = inspect.signature(function).parameters
    unknown = [k for k in strategy_params if k not in accepted]
    if unknown:
        raise LayerscopeError(f"strategy {strategy!r} has no option {unknown[0]!r} "
                              f"(options: {', '.join(p for p in accepted if p != 'inputs')})")
    check_options(strategy, strategy_params)
    metric = strategy_params.get("metric", accepted["metric"].default) if "metric" in accepted else None
    inputs = load_inputs(source, metric=metric, progress=progress, also=(optimizer_metric,) if optimizer else (),
                         include_towers=include_towers, allow_unmapped=allow_unmapped).restrict_roles(target_roles)
    _refuse_beyond_full_rank(inputs, strategy_params)
    result = _for_expert_type(function(inputs, **strategy_params), expert_type)

    allocations, budget_record, params = result.allocations, None, dict(result.params)
    budget, budget_source = _budget(inputs, result, budget_params, budget_ratio, reference_rank, reference_experts)
    if budget is not None:
        fitted = fit_budget(inputs, result, budget)
        allocations = fitted.allocations
        budget_record = {"params": budget, "used": fitted.used, "slack": fitted.slack, "unit": result.scale.unit,
                         "scale_value": fitted.scale_value, "top_ups": fitted.top_ups, "source": budget_source}
        params = fitted_params(result, fitted)
    for table_option in ("activations", "scores"):  # record where a data-driven table came from, not the table
        if strategy_params.get(table_option) is not None:
            value = strategy_params[table_option]
            params[table_option] = str(value) if isinstance(value, (str, Path)) else "in-memory table"
    built = build_plan(inputs, result.name, params, allocations, metric=result.metric, budget=budget_record,
                       expert_type=expert_type, lora=lora or LoraSettings(), reference_rank=reference_rank,
                       reference_experts=reference_experts, command=command)
    if optimizer:
        planned = {layer["layer"] for layer in built.layers if layer["experts"] > 0}
        metric_by_layer = {k: v for k, v in inputs.layer_metric(optimizer_metric).items() if k in planned}
        built.document["optimizer"] = optimizer_section(metric_by_layer, list(optimizer), optimizer_metric)
        built.validate()
    return built


def plan_layers(source, allocations: list, *, name: str, params: dict, target_roles: list[str] | None = None,
                expert_type: str = "lora", lora: LoraSettings | None = None, command: str | None = None) -> Plan:
    """A plan of explicit per-layer allocations (:class:`~layerscope.planning.strategies.LayerAllocation`, a layer
    with 0 experts gets no adapters), as ``layer-value`` trains around a uniform plan; no strategy, no budget."""
    inputs = load_inputs(source, progress=False).restrict_roles(target_roles)
    unknown = sorted({a.layer for a in allocations} - set(inputs.layers))
    if unknown:
        raise LayerscopeError(f"layer {unknown[0]}: not a planned layer of {source} (layers {inputs.layers[:3]}…)")
    typed = [replace(a, expert_type=expert_type) for a in allocations]
    return build_plan(inputs, name, params, typed, metric=None, budget=None, expert_type=expert_type,
                      lora=lora or LoraSettings(), reference_rank=8, reference_experts=8, command=command)


SIZE_KNOBS = {"alphalora": "total_experts", "mola": "total_experts", "adaptive-lora": "base_rank", "uniform": "rank"}
SIZE_KNOB_BY_UNIT = {"experts": "total_experts", "ranks": "base_rank"}  # sensitivity: the knob its unit turns


def _refuse_size_conflict(strategy: str, params: dict, budget_params, budget_ratio) -> None:
    """A budget sets the strategy's size knob: giving the knob too would be silently overridden."""
    knob = SIZE_KNOBS.get(strategy)
    if strategy == "sensitivity":
        knob = SIZE_KNOB_BY_UNIT.get(params.get("unit", "experts"))
    if strategy == "value":
        knob = "total_experts" if params.get("total_experts") is not None else "base_rank"
    if strategy == "hilo":
        knob = "experts" if params.get("experts_mode", "fixed") == "fixed" else None
    if knob and params.get(knob) is not None and (budget_params is not None or budget_ratio is not None):
        budget_flag = "--budget-params" if budget_params is not None else "--budget-ratio"
        raise LayerscopeError(f"{budget_flag} and --{knob.replace('_', '-')} both set the size of the {strategy} plan; "
                              "give one")


def _refuse_beyond_full_rank(inputs, params: dict) -> None:
    """A rank above every target module's smaller side would silently become full rank everywhere."""
    full = max(min(int(m.in_features), int(m.out_features)) for m in inputs.modules.itertuples())
    for name in ("rank", "base_rank", "min_rank"):
        value = params.get(name)
        if isinstance(value, int) and value > full:
            raise LayerscopeError(f"--{name.replace('_', '-')} {value}: above the full rank of every target module "
                                  f"(the largest min(in, out) is {full})")
    ranks = params.get("ranks")
    if ranks and max(ranks) > full:
        raise LayerscopeError(f"--ranks {','.join(map(str, ranks))}: {max(ranks)} is above the full rank of every "
                              f"target module (the largest min(in, out) is {full})")


def _for_expert_type(result: StrategyResult, expert_type: str) -> StrategyResult:
    """Mark every allocation (now and when a budget rescales it) with the plan's expert type."""
    if expert_type not in EXPERT_TYPES:
        raise LayerscopeError(f"--expert-type {expert_type!r}: expected one of {', '.join(EXPERT_TYPES)}")

    def typed(allocations):
        return [replace(a, expert_type=expert_type) for a in allocations]

    scale = replace(result.scale, allocate=lambda value: typed(result.scale.allocate(value)))
    return replace(result, allocations=typed(result.allocations), scale=scale)


def largest_sensible_budget(inputs, experts: int = 8) -> int:
    """What ``experts`` full-rank LoRA experts on every target module would train (rank = the matrix's smaller
    side): no allocation can use more, so a bigger budget (millions of experts per layer) is a typo, not a plan."""
    return int(experts * sum(copies * min(in_f, out_f) * (in_f + out_f)
                             for layer in inputs.shapes_by_layer.values() for _, in_f, out_f, copies in layer))


def _budget(inputs, result, budget_params, budget_ratio, reference_rank,
            reference_experts: int = 8) -> tuple[int | None, str | None]:
    largest = largest_sensible_budget(inputs, max(reference_experts, 8))
    if budget_params is not None:
        if budget_params < 1:
            raise LayerscopeError(f"--budget-params {budget_params}: must be >= 1")
        if budget_params > largest:
            raise LayerscopeError(f"--budget-params {budget_params:,}: more than {max(reference_experts, 8)} full-rank "
                                  f"experts on every target module would train; the largest sensible budget is "
                                  f"{largest:,}")
        return int(budget_params), "budget_params"
    if budget_ratio is not None:
        if not (budget_ratio > 0 and math.isfinite(budget_ratio)):
            raise LayerscopeError(f"--budget-ratio {budget_ratio}: must be a finite number > 0")
        single = baselines(inputs, reference_rank, 1)["single_lora"]["trainable"]
        if budget_ratio * single > largest:
            raise LayerscopeError(f"--budget-ratio {budget_ratio}: {int(budget_ratio * single):,} parameters, more "
                                  f"than {max(reference_experts, 8)} full-rank experts on every target module would "
                                  f"train; the largest sensible ratio is {largest / single:.4g}")
        return int(budget_ratio * single), f"budget_ratio {budget_ratio} x single rank-{reference_rank} LoRA"
    if result.default_budget is not None:
        return result.default_budget(), "strategy reference (uniform experts x rank)"
    return None, None
