"""Allocation strategies: per-layer inputs → per-layer (experts, rank, top_k).

Each strategy returns a :class:`StrategyResult`: its allocation at the default size, the
parameters it used, and how a budget may rescale it (``scale``: which integer knob, and the
allocation as a function of it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from layerscope.checkpoint.architectures import ROLE_GROUPS, mixer_of_role
from layerscope.errors import LayerscopeError
from layerscope.names import counted
from layerscope.planning.inputs import PlanInputs
from layerscope.planning.rounding import largest_remainder, reference_rounding

MOLA_SHAPES: dict[str, tuple[int, ...]] = {
    "increasing": (2, 4, 6, 8),  # ▽: more experts in higher layers (MoLA's best)
    "decreasing": (8, 6, 4, 2),  # △
    "hourglass": (8, 2, 2, 8),  # ⋈
    "uniform": (5, 5, 5, 5),  # □
}
MOLA_SYMBOLS = {"▽": "increasing", "△": "decreasing", "⋈": "hourglass", "□": "uniform"}
ADAPTIVE_MODES = ("linear-decay", "attention-heavy", "empirical")


@dataclass(frozen=True)
class LayerAllocation:
    layer: int
    experts: int
    rank: int
    top_k: int
    metric: float | None = None
    module_ranks: dict[str, int] = field(default_factory=dict)  # role → rank, where it differs by module
    expert_type: str = "lora"  # lora | mor: what the accounting counts

    def rank_of(self, role: str) -> int:
        return self.module_ranks.get(role, self.rank)

    def rank_for(self, role: str, in_features: int, out_features: int) -> int:
        """The role's rank, capped at the matrix's smaller dimension (a small gate projection of a
        linear-attention block can be narrower than the layer's rank; more rank would add nothing)."""
        return min(self.rank_of(role), in_features, out_features)


@dataclass(frozen=True)
class Scale:
    """The integer knob a budget turns: total experts, or a base rank."""

    unit: str  # "experts" (total) | "experts_per_layer" | "rank"
    default: int
    minimum: int
    allocate: Callable[[int], list[LayerAllocation]]
    weights: list[float]  # the proportional profile over layers, for topping up
    param: str = ""  # the strategy option the knob sets (recorded with the fitted value in the plan)
    top_up: bool = True  # False where one more unit in one layer would break the strategy's defining shape
    keeps_shape: Callable[[int], bool] | None = None  # False at knob values where an option flattens the shape


@dataclass(frozen=True)
class StrategyResult:
    name: str
    params: dict
    allocations: list[LayerAllocation]
    scale: Scale
    metric: str | None = None
    default_budget: Callable[[], int] | None = None  # a budget the strategy itself implies (HILO inverse-rank)


def _top_k(experts: int, top_k: int) -> int:
    return min(top_k, experts) if experts > 1 else 1


def stack_depth_groups(inputs: PlanInputs, groups: int) -> list[list[int]]:
    """``groups`` depth groups counted within each block stack, merged group by group (group g holds the g-th
    group of every stack), so a vision tower's first blocks are shallow, not deeper than the language model.
    A stack shorter than ``groups`` (a small tower) spreads its layers over the groups by relative depth."""
    stacks = inputs.stack_layers
    if len(stacks) == 1:
        return depth_groups(stacks[0], groups)
    merged: list[list[int]] = [[] for _ in range(groups)]
    for layers in stacks:
        if len(layers) >= groups:
            for g, group in enumerate(depth_groups(layers, groups)):
                merged[g].extend(group)
        else:
            for i, layer in enumerate(layers):
                merged[round(i * (groups - 1) / max(1, len(layers) - 1))].append(layer)
    return [sorted(group) for group in merged]


def depth_groups(layers: list[int], groups: int) -> list[list[int]]:
    """Contiguous, near-equal groups of layers (32 layers, 4 groups → 8 each)."""
    if groups > len(layers):
        raise LayerscopeError(f"{groups} groups need at least {groups} layers (model has {len(layers)})")
    return [list(map(int, g)) for g in np.array_split(np.asarray(layers), groups)]


# ---------------------------------------------------------------- alphalora

EXPERTS_PER_LAYER = 5  # MoLA's □ and AlphaLoRA's T = 160 on 32 layers; the depth-scaled default total


def alphalora(inputs: PlanInputs, total_experts: int | None = None, beta: float = 2.5, metric: str = "alpha_peak",
              rounding: str = "largest-remainder", min_experts: int = 1, max_experts: int | None = None,
              rank: int = 8, top_k: int = 2) -> StrategyResult:
    """s_i ∝ v_i^β, v_i = mean of ``metric`` over layer i's projections: higher alpha, more experts.
    ``total_experts`` defaults to 5 per layer (AlphaLoRA's 160 on 32 layers), so a 6-layer model gets 30."""
    if rounding not in ("largest-remainder", "reference"):
        raise LayerscopeError(f"--rounding {rounding!r}: expected largest-remainder or reference")
    values = inputs.layer_metric(metric)
    layers = sorted(values)
    v = [values[i] for i in layers]
    if any(x <= 0 for x in v):
        raise LayerscopeError(f"metric {metric!r} must be > 0 in every layer for alpha^beta shares")
    powered = [x**beta for x in v]
    if total_experts is None:
        total_experts = EXPERTS_PER_LAYER * len(layers)

    def allocate(total: int) -> list[LayerAllocation]:
        if rounding == "reference":
            counts = reference_rounding(v, total, beta)
            negative = [(layers[i], c) for i, c in enumerate(counts) if c < 0]
            if negative:
                raise LayerscopeError(f"reference rounding gave layer {negative[0][0]} {counted(negative[0][1], 'expert')}")
        else:
            counts = largest_remainder(powered, total, min_experts, max_experts)
        return [LayerAllocation(layer, c, rank, _top_k(c, top_k), metric=val)
                for layer, c, val in zip(layers, counts, v)]

    params = dict(total_experts=total_experts, beta=beta, metric=metric, rounding=rounding,
                  min_experts=min_experts, max_experts=max_experts, rank=rank, top_k=top_k)
    scale = Scale("experts", total_experts, max(1, min_experts) * len(layers), allocate, powered, "total_experts")
    return StrategyResult("alphalora", params, allocate(total_experts), scale, metric=metric)


# ---------------------------------------------------------------- mola

def mola(inputs: PlanInputs, shape: str | None = None, pattern: tuple[int, ...] | None = None,
         total_experts: int | None = None, rank: int = 8, top_k: int = 2) -> StrategyResult:
    """MoLA's group presets generalised to any depth: group boundaries from the layer count.  ``shape``
    (default ▽) names a preset; ``pattern`` gives the experts per group instead — not both."""
    if shape is not None and pattern is not None:
        raise LayerscopeError(f"--shape {shape} and --pattern {','.join(map(str, pattern))}: give one (a shape is a "
                              "named pattern)")
    shape = "▽" if shape is None and pattern is None else shape
    name = MOLA_SYMBOLS.get(shape, shape) if shape is not None else "custom"
    if pattern is None:
        if name not in MOLA_SHAPES:
            known = ", ".join([*MOLA_SYMBOLS, *MOLA_SHAPES])
            raise LayerscopeError(f"--shape {shape!r}: unknown (known: {known})")
        pattern = MOLA_SHAPES[name]
    if any(p < 1 for p in pattern):
        raise LayerscopeError(f"--pattern {pattern}: every group needs at least 1 expert")
    layers = inputs.layers
    per_layer = {layer: count for group, count in zip(stack_depth_groups(inputs, len(pattern)), pattern)
                 for layer in group}
    weights = [float(per_layer[layer]) for layer in layers]
    preset_total = int(sum(weights))

    def allocate(total: int) -> list[LayerAllocation]:
        counts = [per_layer[layer] for layer in layers] if total == preset_total else largest_remainder(weights, total, 1)
        return [LayerAllocation(layer, c, rank, _top_k(c, top_k)) for layer, c in zip(layers, counts)]

    total = total_experts if total_experts is not None else preset_total
    params = dict(shape=name, pattern=list(pattern), total_experts=total, rank=rank, top_k=top_k)
    return StrategyResult("mola", params, allocate(total),
                          Scale("experts", total, len(layers), allocate, weights, "total_experts"))


# ---------------------------------------------------------------- hilo

def hilo(inputs: PlanInputs, ranks: tuple[int, ...] = (2, 4, 6, 8), experts: int = 8, top_k: int = 2,
         rank_source: str = "depth", activations=None, experts_mode: str = "fixed",
         reference_experts: int = 8, reference_rank: int = 8) -> StrategyResult:
    """HILO: rank tiers rising with depth (or with falling near-zero fraction), 8 experts, top-2.

    ``experts_mode="inverse-rank"``: expert counts ∝ 1/rank, sized so the trainable parameters
    match uniform ``reference_experts`` experts at ``reference_rank`` (HILO's budgeted variant).
    """
    if any(r < 1 for r in ranks):
        raise LayerscopeError(f"--ranks {ranks}: ranks must be >= 1")
    if experts_mode not in ("fixed", "inverse-rank"):
        raise LayerscopeError(f"--experts-mode {experts_mode!r}: expected fixed or inverse-rank")
    layers = inputs.layers
    if len(ranks) > len(layers):
        n = len(layers)
        fewer = [ranks[round(i * (len(ranks) - 1) / (n - 1))] for i in range(n)] if n > 1 else [ranks[-1]]
        raise LayerscopeError(f"--ranks {','.join(map(str, ranks))}: {len(ranks)} rank tiers need at least "
                              f"{len(ranks)} layers, and this model plans {n}; give at most {n} tiers, e.g. --ranks "
                              f"{','.join(map(str, fewer))}")
    tiers = _rank_tiers(inputs, list(ranks), rank_source, activations)
    rank_of = {layer: r for group, r in zip(tiers, ranks) for layer in group}
    weights = [1.0 / rank_of[layer] if experts_mode == "inverse-rank" else 1.0 for layer in layers]

    def allocate(total: int) -> list[LayerAllocation]:
        counts = largest_remainder(weights, total, 1)
        return [LayerAllocation(layer, c, rank_of[layer], _top_k(c, top_k)) for layer, c in zip(layers, counts)]

    def allocate_fixed(per_layer: int) -> list[LayerAllocation]:
        # HILO's fixed mode is defined by the same expert count in every layer: a budget scales that count.
        return [LayerAllocation(layer, per_layer, rank_of[layer], _top_k(per_layer, top_k)) for layer in layers]

    default_total = experts * len(layers)
    params = dict(ranks=list(ranks), experts=experts, top_k=top_k, rank_source=rank_source,
                  experts_mode=experts_mode, reference_experts=reference_experts, reference_rank=reference_rank)
    default_budget = None
    if experts_mode == "inverse-rank":
        from layerscope.planning.accounting import account

        def default_budget() -> int:
            uniform = [LayerAllocation(layer, reference_experts, reference_rank, _top_k(reference_experts, top_k))
                       for layer in layers]
            return account(inputs, uniform).trainable_total

        params["total_experts"] = default_total
        scale = Scale("experts", default_total, len(layers), allocate, weights, "total_experts")
        return StrategyResult("hilo", params, allocate(default_total), scale, default_budget=default_budget)
    scale = Scale("experts_per_layer", experts, 1, allocate_fixed, [1.0] * len(layers), "experts", top_up=False)
    return StrategyResult("hilo", params, allocate_fixed(experts), scale)


def _rank_tiers(inputs: PlanInputs, ranks: list[int], source: str, activations) -> list[list[int]]:
    layers, fingerprint = inputs.layers, inputs.model.fingerprint
    groups = stack_depth_groups(inputs, len(ranks))
    if source == "depth":
        return groups
    if source != "activations":
        raise LayerscopeError(f"--rank-source {source!r}: expected depth or activations")
    fractions = _near_zero_by_layer(activations, layers, fingerprint)
    # Most near-zero outputs → lowest rank tier; tier sizes as in the depth scheme, so a stack
    # of identically shaped layers keeps exactly the depth scheme's parameter count.
    ordered = sorted(layers, key=lambda layer: (-fractions[layer], layer))
    tiers, start = [], 0
    for group in groups:
        tiers.append(sorted(ordered[start:start + len(group)]))
        start += len(group)
    return tiers


def _near_zero_by_layer(activations, layers: list[int], fingerprint: str) -> dict[int, float]:
    if activations is None:
        raise LayerscopeError("--rank-source activations needs --activations FILE (layer, near_zero_fraction)")
    if isinstance(activations, (str, Path)):
        path = Path(activations)
        if not path.is_file():
            raise LayerscopeError(f"--activations {path}: no such file")
        try:
            table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception as exc:
            raise LayerscopeError(f"--activations {path}: cannot read ({type(exc).__name__}: {exc})") from None
        source = str(path)
    else:
        table, source = pd.DataFrame(activations), "activations table"
    for column in ("layer", "near_zero_fraction"):
        if column not in table.columns:
            raise LayerscopeError(f"{source}: column {column!r} is missing")
    measured_on = table.attrs.get("fingerprint")
    if measured_on and measured_on != fingerprint:
        raise LayerscopeError(f"{source}: measured on another model (header fingerprint differs)")
    if "kind" in table.columns:  # a layerscope activations table: projections only, not block outputs
        table = table[table["kind"] == "projection"]
    means = table.groupby("layer")["near_zero_fraction"].mean()
    missing = [layer for layer in layers if layer not in means.index]
    if missing:
        raise LayerscopeError(f"{source}: no near_zero_fraction for layer {missing[0]}")
    return {layer: float(means[layer]) for layer in layers}


# ---------------------------------------------------------------- adaptive-lora

def adaptive_lora(inputs: PlanInputs, mode: str = "linear-decay", base_rank: int = 16, min_rank: int = 4,
                  max_rank: int | None = None) -> StrategyResult:
    """The Adaptive-LoRA seed's three rank formulas, one expert per module.

    linear-decay:    rank_i = max(r_min, r_base - (r_base - r_min) * i / (L - 1))
    attention-heavy: attention modules r_base, feed-forward max(r_min, r_base / 2)
    empirical:       0.6 r_base if i < 0.3 L; 1.2 r_base if i < 0.7 L; r_base otherwise
    Real-valued ranks are truncated to integers (int()), which reproduces the seed's reported
    average rank of 9.5 for linear decay 16 → 4 on 24 layers; all ranks are capped at r_max
    (default 2 · r_base, so the cap scales with a budget and never flattens the profile; a budget
    that would need ranks above an explicit ``max_rank`` is refused rather than flattened).
    """
    if mode not in ADAPTIVE_MODES:
        raise LayerscopeError(f"--mode {mode!r}: expected one of {', '.join(ADAPTIVE_MODES)}")
    roles = sorted(set(inputs.modules["role"]))
    # depth i of n counts within each block stack (a vision tower restarts at its own first block)
    positions = [(layer, i, len(stack)) for stack in inputs.stack_layers for i, layer in enumerate(stack)]

    def formula(base: int) -> list[LayerAllocation]:
        out = []
        for layer, i, n in positions:
            if mode == "linear-decay":
                rank = base - (base - min_rank) * i / (n - 1) if n > 1 else base
                rank, module_ranks = max(min_rank, int(rank)), {}
            elif mode == "empirical":
                factor = 0.6 if i < 0.3 * n else 1.2 if i < 0.7 * n else 1.0
                rank, module_ranks = int(base * factor), {}
            else:
                ffn = max(min_rank, int(base / 2))
                module_ranks = {role: (base if role in ROLE_GROUPS["attention"] or mixer_of_role(role) else ffn)
                                for role in roles}
                rank = base
            out.append(LayerAllocation(layer, 1, max(1, rank), 1, module_ranks=module_ranks))
        return out

    def allocate(base: int) -> list[LayerAllocation]:
        cap = max_rank if max_rank is not None else 2 * base
        return [_capped(a, cap) for a in formula(base)]

    def keeps_shape(base: int) -> bool:
        """An explicit --max-rank that would flatten the profile at this base rank: a budget stops below it."""
        return max_rank is None or max(r for a in formula(base) for r in (a.rank, *a.module_ranks.values())) <= max_rank

    params = dict(mode=mode, base_rank=base_rank, min_rank=min_rank, max_rank=max_rank)
    weights = [float(a.rank) for a in allocate(base_rank)]
    return StrategyResult("adaptive-lora", params, allocate(base_rank),
                          Scale("rank", base_rank, max(1, min_rank), allocate, weights, "base_rank",
                                keeps_shape=keeps_shape))


def _capped(allocation: LayerAllocation, cap: int) -> LayerAllocation:
    return replace(allocation, rank=min(cap, allocation.rank),
                   module_ranks={r: min(cap, v) for r, v in allocation.module_ranks.items()})


# ---------------------------------------------------------------- uniform

def uniform(inputs: PlanInputs, experts: int = 1, rank: int = 8, top_k: int = 2) -> StrategyResult:
    """The baseline: the same experts, rank and top-k everywhere."""
    layers = inputs.layers

    def allocate(r: int) -> list[LayerAllocation]:
        return [LayerAllocation(layer, experts, r, _top_k(experts, top_k)) for layer in layers]

    params = dict(experts=experts, rank=rank, top_k=top_k)
    # No top-ups: one more rank in some layers would make "uniform" non-uniform (61/60).
    scale = Scale("rank", rank, 1, allocate, [1.0] * len(layers), "rank", top_up=False)
    return StrategyResult("uniform", params, allocate(rank), scale)


# ---------------------------------------------------------------- option checks (before any solving)

COUNT_OPTIONS = ("total_experts", "experts", "rank", "top_k", "base_rank", "min_rank", "max_rank", "max_experts",
                 "reference_experts", "reference_rank")


def check_options(strategy: str, params: dict) -> None:
    """Refuse options no allocation can honour, naming the flag (``--top-k 5 --experts 2``, ``--experts 0``)."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in COUNT_OPTIONS:
        value = params.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LayerscopeError(f"{flag(name)} {value}: must be a whole number >= 1")
    if params.get("min_experts") is not None and params["min_experts"] < 0:
        raise LayerscopeError(f"--min-experts {params['min_experts']}: must be >= 0")
    for name in ("ranks", "pattern"):
        values = params.get(name)
        if values is not None and (not values or any(v < (1 if name == "ranks" else 0) for v in values)):
            raise LayerscopeError(f"{flag(name)} {','.join(map(str, values))}: every entry must be >= "
                                  f"{1 if name == 'ranks' else 0}")
    top_k = params.get("top_k")
    if top_k is not None:
        most = {"uniform": params.get("experts", 1),
                "hilo": params.get("experts", 8) if params.get("experts_mode", "fixed") == "fixed" else None,
                "alphalora": params.get("max_experts") or params.get("total_experts"),
                "sensitivity": params.get("total_experts"),
                "value": params.get("total_experts"),
                "mola": max(params["pattern"]) if params.get("pattern") else params.get("total_experts")}.get(strategy)
        if most is not None and top_k > most:
            raise LayerscopeError(f"--top-k {top_k}: more than the {most} expert(s) a layer can have here "
                                  "(top-k routes among a layer's experts)")
    low, base, high = params.get("min_rank"), params.get("base_rank"), params.get("max_rank")
    if low is not None and high is not None and low > high:
        raise LayerscopeError(f"--min-rank {low} > --max-rank {high}")
    if base is not None and high is not None and base > high:
        raise LayerscopeError(f"--base-rank {base} > --max-rank {high}")
    if strategy == "adaptive-lora" and (base or 16) < (low or 4):
        raise LayerscopeError(f"--base-rank {base or 16} < --min-rank {low or 4}: the base rank is the largest of the "
                              "profile")


def with_top_up(allocation: LayerAllocation, unit: str, top_k: int) -> LayerAllocation:
    """One more unit (an expert, or one rank in every module) for a layer."""
    if unit == "experts":
        experts = allocation.experts + 1
        return replace(allocation, experts=experts, top_k=_top_k(experts, max(top_k, allocation.top_k)))
    return replace(allocation, rank=allocation.rank + 1,
                   module_ranks={r: v + 1 for r, v in allocation.module_ranks.items()})


def validate_positive(name: str, value: float | int | None, minimum: float = 1) -> None:
    if value is not None and (not math.isfinite(value) or value < minimum):
        raise LayerscopeError(f"--{name} {value}: must be >= {minimum}")
