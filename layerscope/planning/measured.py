"""Strategies that plan from measurements on the user's own task, not from the weights alone.

* ``sensitivity``: Σ|W ⊙ ∂L/∂W| on a few batches of the task's rows (``layerscope sensitivity``).
* ``value``: what extra capacity in each group of layers was worth on the task itself
  (``layerscope layer-value``'s ``value.json``).  Trained against its uniform plan on other seeds and the
  test rows, it is the *oracle bound*: the most an allocation informed by the task can win.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.planning.inputs import PlanInputs
from layerscope.planning.rounding import largest_remainder
from layerscope.planning.strategies import EXPERTS_PER_LAYER, LayerAllocation, Scale, StrategyResult, _top_k

VALUE_SCHEMA = "layerscope.layer-value/1"
VALUE_ESTIMATES = ("add", "drop")
PER_MILLION = 1e6


SENSITIVITY_UNITS = ("experts", "ranks")


def sensitivity(inputs: PlanInputs, scores=None, unit: str = "experts", beta: float = 1.0,
                total_experts: int | None = None, rank: int = 8, top_k: int = 2, min_experts: int = 1,
                base_rank: int = 8, min_rank: int = 1) -> StrategyResult:
    """A static importance from the user's own rows: v_i = mean over layer i's target matrices of
    Σ|W ⊙ ∂L/∂W| (``layerscope sensitivity``), the quantity AdaLoRA tracks while training, frozen into a plan.

    ``unit="experts"``: experts ∝ v_i^β at one rank (as alphalora; 5 per layer by default), compared with MoLA □.
    ``unit="ranks"``: one expert per module, ranks ∝ v_i^β summing to ``base_rank`` × layers (each at least
    ``min_rank``), compared with one uniform rank at equal trainable parameters.
    """
    if unit not in SENSITIVITY_UNITS:
        raise LayerscopeError(f"--unit {unit!r}: expected one of {', '.join(SENSITIVITY_UNITS)}")
    if not (math.isfinite(beta) and beta >= 0):
        raise LayerscopeError(f"--beta {beta}: must be a finite number >= 0")
    layers = inputs.layers
    values = _sensitivity_by_layer(scores, layers, inputs.model.fingerprint)
    v = [values[layer] for layer in layers]
    powered = [x**beta for x in v]
    params = dict(unit=unit, beta=beta)
    shares = _Shares("sensitivity", layers, powered, v, params, "sensitivity")
    if unit == "experts":
        total = total_experts if total_experts is not None else EXPERTS_PER_LAYER * len(layers)
        return shares.experts(total, rank, top_k, min_experts)
    return shares.ranks(base_rank, min_rank)


def _sensitivity_by_layer(scores, layers: list[int], fingerprint: str) -> dict[int, float]:
    """Per layer, the mean of the ``sensitivity`` column over its projections (file or DataFrame)."""
    if scores is None:
        raise LayerscopeError("--strategy sensitivity needs --scores FILE (from `layerscope sensitivity MODEL "
                              "--task ROWS --out FILE`)")
    if isinstance(scores, (str, Path)):
        from layerscope.tables import read_sensitivity

        table, source = read_sensitivity(scores), str(scores)
    else:
        table, source = pd.DataFrame(scores), "sensitivity table"
        table.attrs.update(getattr(scores, "attrs", {}))
    for column in ("layer", "sensitivity"):
        if column not in table.columns:
            raise LayerscopeError(f"{source}: column {column!r} is missing")
    measured_on = table.attrs.get("fingerprint")
    if measured_on and fingerprint and measured_on != fingerprint:
        raise LayerscopeError(f"{source}: measured on another model (header fingerprint differs)")
    means = table.groupby("layer")["sensitivity"].mean()
    missing = [layer for layer in layers if layer not in means.index]
    if missing:
        raise LayerscopeError(f"{source}: no sensitivity for layer {missing[0]}")
    values = {layer: float(means[layer]) for layer in layers}
    bad = [layer for layer, value in values.items() if not (math.isfinite(value) and value > 0)]
    if bad:
        raise LayerscopeError(f"{source}: layer {bad[0]} has sensitivity {values[bad[0]]!r}; shares need a finite "
                              "value > 0 in every layer (did the loss reach every layer?)")
    return values


# ---------------------------------------------------------------- value

def value(inputs: PlanInputs, value=None, estimate: str = "add", unit: str | None = None,
          total_experts: int | None = None, rank: int | None = None, top_k: int | None = None,
          base_rank: int | None = None, min_experts: int = 1, min_rank: int = 1) -> StrategyResult:
    """Capacity ∝ the value each layer's group showed on the task (``layerscope layer-value``'s ``value.json``).

    v_i = the measured value per parameter of layer i's group: with ``estimate="add"``, the gain in the
    validation metric from doubling the group's capacity; with ``"drop"``, the loss from removing its adapters.
    Negative values count as 0 (capacity there did not help).  Shares ∝ v_i maximise Σ v_i log n_i, the
    greedy allocation under diminishing (logarithmic) returns; every layer keeps ``min_experts`` /
    ``min_rank``.  ``unit`` (default: the value table's) spreads experts at one rank, or ranks of one expert
    per module; the default size and shapes are the uniform plan the values were measured around.
    """
    if estimate not in VALUE_ESTIMATES:
        raise LayerscopeError(f"--estimate {estimate!r}: expected one of {', '.join(VALUE_ESTIMATES)}")
    table = read_value_table(value, inputs.model.fingerprint)
    unit = unit or table["unit"]
    if unit not in ("experts", "ranks"):
        raise LayerscopeError(f"--unit {unit!r}: expected experts or ranks")
    layers = inputs.layers
    per_layer = _value_by_layer(table, layers, estimate, str(value) if isinstance(value, (str, Path)) else "value")
    v = [per_layer[layer] * PER_MILLION for layer in layers]  # the plan's v_i: value per million parameters
    weights = [max(0.0, x) for x in v]
    if not any(weights):
        raise LayerscopeError(f"{value}: no group of layers gained from capacity ({estimate} values all <= 0); "
                              "no allocation is informed by this table, so the uniform plan is the plan")
    uniform = table["uniform"]
    params = dict(value=str(value) if isinstance(value, (str, Path)) else "in-memory table", estimate=estimate,
                  unit=unit)
    shares = _Shares("value", layers, weights, v, params, f"value_{estimate}_per_million")
    if unit == "experts":
        measured_experts = int(uniform["experts"]) if table["unit"] == "experts" else EXPERTS_PER_LAYER
        total = total_experts if total_experts is not None else measured_experts * len(layers)
        return shares.experts(total, rank if rank is not None else int(uniform["rank"]),
                              top_k if top_k is not None else int(uniform["top_k"]), min_experts)
    base = base_rank if base_rank is not None else int(uniform["rank"]) if table["unit"] == "ranks" else 8
    return shares.ranks(base, min_rank)


class _Shares:
    """Capacity in proportion to per-layer ``weights``: experts at one rank, or ranks of one expert per module,
    each layer keeping its minimum, the shares rounded by largest remainder; ``values`` are the plan's v_i."""

    def __init__(self, name: str, layers: list[int], weights: list[float], values: list[float], params: dict,
                 metric: str):
        self.name, self.layers, self.weights, self.values = name, layers, weights, values
        self.params, self.metric = params, metric

    def experts(self, total: int, rank: int, top_k: int, min_experts: int) -> StrategyResult:
        def allocate(count: int) -> list[LayerAllocation]:
            counts = largest_remainder(self.weights, count, min_experts)
            return [LayerAllocation(layer, c, rank, _top_k(c, top_k), metric=val)
                    for layer, c, val in zip(self.layers, counts, self.values)]

        params = {**self.params, "total_experts": total, "rank": rank, "top_k": top_k, "min_experts": min_experts}
        scale = Scale("experts", total, max(1, min_experts) * len(self.layers), allocate, self.weights,
                      "total_experts")
        return StrategyResult(self.name, params, allocate(total), scale, metric=self.metric)

    def ranks(self, base: int, min_rank: int) -> StrategyResult:
        def allocate(base_value: int) -> list[LayerAllocation]:
            ranks = largest_remainder(self.weights, base_value * len(self.layers), min_rank)
            return [LayerAllocation(layer, 1, r, 1, metric=val) for layer, r, val in zip(self.layers, ranks, self.values)]

        params = {**self.params, "base_rank": base, "min_rank": min_rank}
        scale = Scale("rank", base, max(1, min_rank), allocate, self.weights, "base_rank")
        return StrategyResult(self.name, params, allocate(base), scale, metric=self.metric)


def read_value_table(source, fingerprint: str | None) -> dict:
    """A ``layerscope.layer-value/1`` document (a path or the dict), checked against this model."""
    from layerscope.strictjson import strict_json

    if source is None:
        raise LayerscopeError("--strategy value needs --value FILE (the value.json of `layerscope layer-value`)")
    if isinstance(source, dict):
        document, where = source, "value table"
    else:
        path = Path(source)
        if not path.is_file():
            raise LayerscopeError(f"--value {path}: no such file")
        document, where = strict_json(path.read_bytes(), str(path)), str(path)
    if not isinstance(document, dict) or document.get("schema") != VALUE_SCHEMA:
        raise LayerscopeError(f"{where}: not a layer-value table (schema {VALUE_SCHEMA} expected)")
    for field in ("unit", "uniform", "groups"):
        if field not in document:
            raise LayerscopeError(f"{where}: field {field!r} is missing")
    if fingerprint and document.get("fingerprint") and document["fingerprint"] != fingerprint:
        raise LayerscopeError(f"{where}: measured on another model (header fingerprint differs)")
    return document


def _value_by_layer(table: dict, layers: list[int], estimate: str, where: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for group in table["groups"]:
        measured = (group.get(estimate) or {}).get("per_param", {}).get("mean")
        if measured is None or not math.isfinite(measured):
            raise LayerscopeError(f"{where}: group {group.get('group')} has no finite {estimate} value per parameter")
        values.update({int(layer): float(measured) for layer in group["layers"]})
    missing = [layer for layer in layers if layer not in values]
    if missing:
        raise LayerscopeError(f"{where}: no value for layer {missing[0]} (the table's groups cover "
                              f"{sorted(values)})")
    return values
