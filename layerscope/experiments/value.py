"""``layer_value``: what extra capacity in each group of layers is worth on the user's own task.

Around the uniform plan U at a budget (one LoRA of one rank per module with ``unit="ranks"``, or the same
experts per layer at one expert rank with ``unit="experts"``), with groups of consecutive layers (every layer
for models of up to 12 layers, else ``groups`` near-equal groups counted within each block stack), it trains:

* U itself;
* ``add g``: U with group g's capacity doubled (its rank, or its experts);
* ``drop g``: U without group g's adapters.

Every arm trains with every seed on the same batches per seed (the run store of compare-plans, so runs
resume and are shared), and is scored on the *validation* rows only (``final_validation``): the test rows stay
untouched for the oracle comparison (``compare-plans --plans value:value.json`` with other seeds).  Per group:
the gain of ``add g`` and the loss of ``drop g`` against U of the same seed, per parameter, with 95 %
intervals over seeds; whether the groups differ at all; and the rank correlation of every planning signal with
the measured value (:mod:`layerscope.experiments.value_stats`).  Writes ``value.json`` and ``value.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.experiments import distributed, value_stats
from layerscope.experiments.arms import Arm, PlanSettings
from layerscope.experiments.budgets import REFERENCE_RANK, Budget, reference_budget, resolve
from layerscope.experiments.runs import Settings, check_model_for_task, higher_is_better, metric_name
from layerscope.experiments.store import Log, RunStore
from layerscope.experiments.task import Task
from layerscope.outputs import write_files
from layerscope.planning import Plan, plan
from layerscope.planning.api import plan_layers
from layerscope.planning.measured import VALUE_SCHEMA
from layerscope.planning.strategies import LayerAllocation, stack_depth_groups

SCHEMA = VALUE_SCHEMA
UNITS = ("ranks", "experts")
EVERY_LAYER_UP_TO = 12  # models this deep get one group per layer
DEFAULT_GROUPS = 6
MIXTURE_TOP_K = 2


@dataclass
class ValueArms:
    """The uniform plan, and per group its doubled and dropped variants."""

    budget: Budget
    unit: str
    groups: list[list[int]]
    uniform: Arm
    add: list[Arm]
    drop: list[Arm]

    @property
    def all(self) -> list[Arm]:
        return [self.uniform, *self.add, *self.drop]


def layer_value(model: str | Path, task: Task, *, budget: float, seeds: list[int], settings: Settings,
                out: str | Path, groups: int | None = None, unit: str = "ranks",
                plan_settings: PlanSettings | None = None, signals: bool = True, progress: bool = True) -> dict:
    """Train U, every ``add g`` and every ``drop g`` with every seed (resuming stored runs); write and return
    ``value.json`` (and ``value.png``).  ``budget``: a ratio of the default budget, or trainable parameters
    (as ``compare-plans --budgets``).  ``signals``: also measure every planning signal per group (a scan, the
    task's sensitivity and near-zero fractions) and correlate it with the value."""
    settings.check()
    _check_seeds(seeds)
    model, out = str(model), Path(out)
    check_model_for_task(model, task)
    world = distributed.join()
    try:
        log = Log(progress, world, "layer-value")
        arms = value_arms(model, task, budget, groups, unit, plan_settings or PlanSettings())
        store = RunStore(out / "runs", model, task)
        todo = [(arm, seed) for seed in seeds for arm in arms.all]
        for number, (arm, seed) in enumerate(todo, 1):
            if world.owns(number - 1):
                store.run(arm, seed, settings, log, f"run {number}/{len(todo)}")
        world.barrier()
        records = {arm.name: {seed: store.load(arm, seed, settings) for seed in seeds} for arm in arms.all}
        measured = None
        if signals:
            from layerscope.experiments.signals import group_signals

            measured = group_signals(model, task, arms.uniform.plan, arms.groups, out=out, settings=settings,
                                     world=world, log=log)
        document = _document(model, task, arms, records, seeds, settings, measured)
        if world.is_main:
            _write_outputs(out, document)
        world.barrier()
        return document
    finally:
        distributed.leave(world)


def planned_value_runs(model: str | Path, task: Task, *, budget: float, seeds: list[int], settings: Settings,
                       out: str | Path, groups: int | None = None, unit: str = "ranks",
                       plan_settings: PlanSettings | None = None) -> pd.DataFrame:
    """What :func:`layer_value` would train, without training: one row per run with its arm, group, trainable
    parameters, seed and whether ``out/runs`` already holds it."""
    settings.check()
    _check_seeds(seeds)
    model = str(model)
    check_model_for_task(model, task)
    arms = value_arms(model, task, budget, groups, unit, plan_settings or PlanSettings())
    store = RunStore(Path(out) / "runs", model, task)
    rows = []
    for seed in seeds:
        for arm in arms.all:
            found = store.find(arm, seed, settings)
            rows.append({"arm": arm.name, "kind": arm.kind, "group": _group_of(arm), "trainable": arm.trainable,
                         "seed": seed, "learning_rate": settings.learning_rate, "stored": found is not None,
                         "seconds_per_step": found["seconds_per_step"] if found else None})
    return pd.DataFrame(rows)


def _check_seeds(seeds: list[int]) -> None:
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise LayerscopeError(f"--seeds {','.join(map(str, seeds))}: give two or more distinct seeds (an interval "
                              "over seeds needs at least two; three or more for a test)")


def value_arms(model: str, task: Task, budget: float, groups: int | None, unit: str,
               settings: PlanSettings) -> ValueArms:
    """U at the budget and its variants, checked: the budget holds one rank per group, the groups fit the layers."""
    uniform = uniform_arm(model, budget, unit, settings)
    resolved = resolve([budget], reference_budget(model, settings)[0])[0]
    base = uniform.plan
    layers = [layer["layer"] for layer in base.layers]
    layer_groups = _groups(model, settings, layers, groups)
    first = base.layers[0]
    experts, rank, top_k = first["experts"], first["rank"], first["top_k"]
    shared = dict(target_roles=settings.target_roles, expert_type=settings.expert_type)

    def variant(kind: str, g: int, group: list[int]) -> Arm:
        allocations = []
        for layer in layers:
            e, r = experts, rank
            if layer in group and kind == "add":
                e, r = (experts * 2, rank) if unit == "experts" else (experts, rank * 2)
            elif layer in group:
                e = 0
            allocations.append(LayerAllocation(layer, e, r, min(top_k, e) if e else 1))
        built = plan_layers(model, allocations, name="layer-value", command=f"layer-value: {kind} group {g}",
                            params={"arm": kind, "group": g, "layers": group, "around": _uniform_label(base, unit)},
                            **shared)
        return Arm(f"{kind}-g{g}@{resolved.label}", built, kind, baseline=uniform.name, budget=resolved.label,
                   built=f"{kind} group {g} (layers {_span(group)})")

    return ValueArms(resolved, unit, layer_groups, uniform,
                     [variant("add", g, group) for g, group in enumerate(layer_groups)],
                     [variant("drop", g, group) for g, group in enumerate(layer_groups)])


def uniform_arm(model: str, budget: float, unit: str, settings: PlanSettings) -> Arm:
    """U: the largest uniform plan within ``budget`` (a ratio of the default budget, or trainable parameters)."""
    if unit not in UNITS:
        raise LayerscopeError(f"--unit {unit!r}: expected one of {', '.join(UNITS)}")
    resolved = resolve([budget], reference_budget(model, settings)[0])[0]
    base = _uniform_at(model, resolved, unit, settings)
    return Arm(f"{_uniform_label(base, unit)}@{resolved.label}", base, "uniform", budget=resolved.label,
               built=f"uniform at {resolved.label}: {_uniform_label(base, unit)}")


def _uniform_at(model: str, budget: Budget, unit: str, settings: PlanSettings) -> Plan:
    """The largest uniform plan within the budget: a rank (one LoRA per module), or experts per layer at the budget
    curve's expert rank (max(1, round(8 × ratio)), top-2)."""
    shared = dict(target_roles=settings.target_roles, expert_type=settings.expert_type, progress=False,
                  command=f"layer-value: uniform at {budget.label}")

    def at(size: int) -> Plan:
        if unit == "ranks":
            return plan(model, "uniform", experts=1, rank=size, top_k=1, **shared)
        rank = max(1, round(REFERENCE_RANK * budget.ratio))
        return plan(model, "uniform", experts=size, rank=rank, top_k=min(MIXTURE_TOP_K, size), **shared)

    def cost(candidate: Plan) -> int:
        return int(candidate.accounting["trainable"]["total"])

    smallest = at(1)
    if cost(smallest) > budget.params:
        what = "one rank-1 LoRA" if unit == "ranks" else f"one rank-{smallest.layers[0]['rank']} expert"
        raise LayerscopeError(f"--budget {budget.label} ({budget.params:,} parameters): too small for {what} per "
                              f"module in every layer ({cost(smallest):,}); give a larger budget")
    low, high = 1, 2
    while cost(at(high)) <= budget.params:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if cost(at(mid)) <= budget.params else (low, mid)
    return at(low)


def _groups(model: str, settings: PlanSettings, layers: list[int], groups: int | None) -> list[list[int]]:
    from layerscope.planning.inputs import load_inputs

    if groups is not None and groups < 2:
        raise LayerscopeError(f"--groups {groups}: give 2 or more (value is measured between groups)")
    if groups is not None and groups > len(layers):
        raise LayerscopeError(f"--groups {groups}: more groups than the {len(layers)} planned layers")
    count = groups or (len(layers) if len(layers) <= EVERY_LAYER_UP_TO else DEFAULT_GROUPS)
    inputs = load_inputs(model, progress=False).restrict_roles(settings.target_roles)
    return [group for group in stack_depth_groups(inputs, count) if group]


def _uniform_label(base: Plan, unit: str) -> str:
    first = base.layers[0]
    if unit == "ranks":
        return f"uniform-r{first['rank']}"
    return f"uniform-{first['experts']}x-r{first['rank']}-top{first['top_k']}"


def _span(group: list[int]) -> str:
    return str(group[0]) if len(group) == 1 else f"{group[0]}–{group[-1]}"


def _group_of(arm: Arm) -> int | None:
    return arm.plan.strategy["params"].get("group") if arm.kind in ("add", "drop") else None


def _document(model: str, task: Task, arms: ValueArms, records: dict[str, dict[int, dict]], seeds: list[int],
              settings: Settings, measured: dict | None) -> dict:
    higher = higher_is_better(task)
    sign = 1.0 if higher else -1.0
    base = [records[arms.uniform.name][s]["final_validation"] for s in seeds]
    uniform_trainable = arms.uniform.trainable
    groups = []
    for g, layers in enumerate(arms.groups):
        add, drop = arms.add[g], arms.drop[g]
        added = add.trainable - uniform_trainable
        removed = uniform_trainable - drop.trainable
        gains = [sign * (records[add.name][s]["final_validation"] - b) for s, b in zip(seeds, base)]
        losses = [sign * (b - records[drop.name][s]["final_validation"]) for s, b in zip(seeds, base)]
        groups.append({"group": g, "layers": layers,
                       "add": {"arm": add.name, "added_params": added,
                               "gain": value_stats.interval(gains),
                               "per_param": value_stats.interval([x / added for x in gains])},
                       "drop": {"arm": drop.name, "removed_params": removed,
                                "loss": value_stats.interval(losses),
                                "per_param": value_stats.interval([x / removed for x in losses])}})
    per_param = {estimate: [group[estimate]["per_param"]["values"] for group in groups] for estimate in ("add", "drop")}
    first = arms.uniform.plan.layers[0]
    document = {
        "schema": SCHEMA, "model": model, "fingerprint": arms.uniform.plan.model["fingerprint"],
        "task": task.describe(), "metric": metric_name(task), "higher_is_better": higher, "split": "validation",
        "seeds": seeds, "settings": asdict(settings), "unit": arms.unit, "budget": arms.budget.as_dict(),
        "uniform": {"arm": arms.uniform.name, "experts": first["experts"], "rank": first["rank"],
                    "top_k": first["top_k"], "trainable": uniform_trainable,
                    "validation": value_stats.interval(base)},
        "groups": groups,
        "differ": {estimate: value_stats.groups_differ(values) for estimate, values in per_param.items()},
        "agreement": value_stats.agreement(per_param["add"], per_param["drop"]),
        "signals": value_stats.signal_correlations(measured, per_param) if measured else [],
        "runs": {arm.name: {"kind": arm.kind, "trainable": arm.trainable, "built": arm.built,
                            "validation": [records[arm.name][s]["final_validation"] for s in seeds],
                            "collapsed": sum(bool(records[arm.name][s].get("collapsed")) for s in seeds),
                            "seconds_per_step": sum(records[arm.name][s]["seconds_per_step"] for s in seeds)
                            / len(seeds)} for arm in arms.all},
        "curves": {arm.name: {str(s): records[arm.name][s]["curve"] for s in seeds} for arm in arms.all},
    }
    document["verdict"] = value_stats.verdict(document)
    return _finite(document)


def _finite(value):
    """NaN/inf → None, so the document is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_outputs(out: Path, document: dict) -> None:
    from layerscope.viz.plots import save_to
    from layerscope.viz.value import plot_layer_value

    figure = plot_layer_value(document)
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    write_files({out / "value.json": lambda tmp: tmp.write_text(text, encoding="utf-8"),
                 out / "value.png": lambda tmp: save_to(figure, tmp)})
