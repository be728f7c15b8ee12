"""The arms of a plan comparison: each strategy with the uniform plan of the same structure.

A strategy makes its claim at fixed structure, so each is paired with its own baseline:

* an *expert-count* strategy (experts vary by layer at one expert rank: alphalora, mola's shapes) →
  the same total experts spread evenly over the same layers (MoLA's □), the same expert rank, top-k,
  expert type, LoRA settings and target roles;
* a *rank* strategy (ranks vary by layer at one expert count: hilo, adaptive-lora) → the same experts
  and top-k at one uniform rank, the rank whose trainable parameters come closest to the strategy's
  (refused beyond the tolerance, saying by how much);
* a strategy that varies both (hilo's inverse-rank experts) → uniform experts (the rounded mean) at the
  rank of closest trainable parameters.

A dense single LoRA of equal trainable parameters (``dense``) answers another question (a mixture or
not) and is a separate arm, compared with the first mixture baseline of the same budget.  Identical
baselines (alphalora and mola at one total share □) are trained once.

``adalora`` is PEFT's AdaLoRA, whose final rank budget equals a uniform LoRA's at the comparison's budget
(``--budget-params``, else the first strategy's trainable parameters, else 5 rank-8 experts per layer);
its baseline is that uniform LoRA trained through PEFT.  With an ``adalora`` arm, every plan of one expert
per module (adaptive-lora, hilo with one expert, sensitivity by ranks, their baselines) trains through
PEFT as well (its exported ``rank_pattern``), so the rank arms share one LoRA implementation
(:mod:`layerscope.experiments.peft_arms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.names import STRATEGIES, counted
from layerscope.planning import Plan, plan
from layerscope.planning.matching import checkpoint_shapes, plan_difference, require_same_model
from layerscope.planning.strategies import EXPERTS_PER_LAYER

DENSE = "dense"
ADALORA = "adalora"
VALUE_PREFIX = "value:"  # value:DIR/value.json, the oracle arm (strategy value planned from a layer-value table)


@dataclass
class Arm:
    name: str
    plan: Plan
    kind: str  # strategy | baseline | dense | reference
    baseline: str | None = None  # the arm this one is compared with
    built: str = ""  # how the arm was made, for the document
    compared: list[str] = field(default_factory=list)  # for a baseline: the strategies it serves
    trainer: str = "layerscope"  # layerscope (runtime) | peft (LoraConfig) | adalora (AdaLoraConfig)
    budget: str | None = None  # the budget's label ("0.25x") in a budget curve
    strategy_name: str | None = None  # the strategy without the budget suffix (alphalora@0.25x → alphalora)

    @property
    def family(self) -> str:
        """The arm's name without its budget suffix: one line of the budget curve."""
        return self.name.rsplit("@", 1)[0] if self.budget else self.name

    @property
    def trainable(self) -> int:
        return int(self.plan.accounting["trainable"]["total"])

    @property
    def active(self) -> int:
        return int(self.plan.accounting["active_per_token"]["total"])


@dataclass(frozen=True)
class PlanSettings:
    """What every arm shares: the roles adapted, expert type and LoRA settings, and per-strategy options."""

    target_roles: list[str] | None = None
    expert_type: str = "lora"
    options: dict[str, dict] = field(default_factory=dict)  # strategy → {option: value}
    budget_params: int | None = None
    tolerance: float = 0.05
    peft_rank_arms: bool = False  # one-expert plans train through PEFT (set where an adalora arm is asked for)


_COMPARED = ", ".join([*(name if name != "value" else "value:FILE" for name in STRATEGIES if name != "uniform"),
                       ADALORA])


def build_arms(model: str, items: list[str | Path], settings: PlanSettings, progress: bool = False) -> list[Arm]:
    """Strategy arms (names planned here, or plan files), their like-for-like baselines, and ``dense`` if asked."""
    if not items:
        raise LayerscopeError(f"--plans: give one or more strategies ({_COMPARED}) or plan files; each is compared "
                              "with the uniform plan of its own structure")
    if not 0 <= settings.tolerance < 1:
        raise LayerscopeError(f"--budget-tolerance {settings.tolerance}: must be in [0, 1)")
    _refuse_repeats(items)
    for strategy in settings.options:
        if strategy not in STRATEGIES:
            raise LayerscopeError(f"--option {strategy}.…: unknown strategy (known: {', '.join(STRATEGIES)})")
    depth = len(_plan(model, "uniform", settings, {}, "depth", budget=False).layers)
    shapes, num_layers, fingerprint = checkpoint_shapes(model)
    arms: list[Arm] = []
    wants_dense = wants_adalora = False
    for item in items:
        text = str(item)
        if text.startswith(VALUE_PREFIX):
            options = {**settings.options.get("value", {}), "value": text[len(VALUE_PREFIX):]}
            arms.append(Arm("value", _plan(model, "value", settings, options, "value arm"), "strategy",
                            built=_describe_options("value", options, settings.budget_params)))
        elif text == DENSE:
            wants_dense = True
        elif text == ADALORA:
            wants_adalora = True
        elif text == "uniform":
            raise LayerscopeError("--plans uniform: every strategy is compared with the uniform plan of its own "
                                  f"structure, built here; name strategies ({_COMPARED}) or plan files (and "
                                  "'dense' for a dense single-LoRA arm)")
        elif text in STRATEGIES:
            defaults = {} if settings.budget_params is not None else _depth_defaults(text, depth)
            options = {**defaults, **settings.options.get(text, {})}
            arms.append(Arm(text, _plan(model, text, settings, options, f"{text} arm"), "strategy",
                            built=_describe_options(text, options, settings.budget_params)))
        else:
            arms.append(_file_arm(Path(text), model, shapes, num_layers, fingerprint))
    if wants_adalora or settings.peft_rank_arms:
        for arm in arms:
            if one_expert_lora(arm.plan):
                arm.trainer = "peft"
    arms.extend(_baselines(model, arms, settings, peft=wants_adalora or settings.peft_rank_arms))
    if wants_adalora:
        arms.extend(_adalora_arms(model, arms, settings))
    if wants_dense:
        arms.append(_dense_arm(model, arms, settings))
    if not any(arm.kind == "strategy" for arm in arms):
        raise LayerscopeError("--plans: no strategy arm to compare (a plan whose layers are all alike is a baseline)")
    return arms


def refuse_value_seeds(arms: list[Arm], seeds: list[int]) -> None:
    """An oracle arm is tested on other seeds than its values were measured with (and on the test rows, which
    layer-value never scores)."""
    from layerscope.planning.measured import read_value_table

    for arm in arms:
        if arm.plan.strategy["name"] != "value":
            continue
        source = arm.plan.strategy["params"]["value"]
        measured = set(read_value_table(source, None).get("seeds", []))
        shared = sorted(measured & set(seeds))
        if shared:
            raise LayerscopeError(f"--seeds: {', '.join(map(str, shared))} also measured the values in {source}; an "
                                  "oracle is tested on fresh seeds (e.g. the values with 100,101,102, the comparison "
                                  "with 0-9)")


def _refuse_repeats(items: list[str | Path]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        text = str(item)
        name = ("value" if text.startswith(VALUE_PREFIX) else text if text in STRATEGIES or text in (DENSE, ADALORA, "uniform")
                else Path(text).stem)
        if name in seen:
            other = seen[name]
            raise LayerscopeError(f"--plans names {name!r} twice ({other} and {text}); every arm needs its own name"
                                  if other != text else f"--plans names {text!r} twice")
        seen[name] = text


def _depth_defaults(strategy: str, depth: int) -> dict:
    """Defaults scaled to this model's depth (160 experts is 5 per layer on 32 layers, 26.7× one LoRA on 6)."""
    if strategy in ("alphalora", "mola"):
        return {"total_experts": EXPERTS_PER_LAYER * depth}
    return {}


def _describe_options(strategy: str, options: dict, budget: int | None) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    fitted = f", fitted to {budget:,} trainable parameters" if budget else ""
    return f"{strategy}({shown}){fitted}" if shown else f"{strategy} defaults{fitted}"


def _plan(model: str, strategy: str, settings: PlanSettings, options: dict, why: str,
          budget: bool = True) -> Plan:
    return plan(model, strategy, budget_params=settings.budget_params if budget else None,
                target_roles=settings.target_roles, expert_type=settings.expert_type, progress=False,
                command=f"compare-plans: {why}", **options)


def _file_arm(path: Path, model: str, shapes, num_layers, fingerprint) -> Arm:
    if not path.exists():
        raise LayerscopeError(f"--plans {path}: neither a strategy ({_COMPARED}, or 'dense') nor a plan file")
    loaded = Plan.load(path)
    require_same_model(plan_difference(loaded, shapes, num_layers, fingerprint, model), str(path), False)
    strategy = loaded.strategy["name"]
    if path.stem in (*STRATEGIES, DENSE, ADALORA) and path.stem != strategy:
        raise LayerscopeError(f"{path}: holds a {strategy} plan, but its name says {path.stem!r}; rename the file so "
                              "the arm's name does not mislead")
    kind = "reference" if structure(loaded) == "uniform" else "strategy"
    return Arm(path.stem, loaded, kind, built=f"plan file {path} ({strategy})")


def structure(the_plan: Plan) -> str:
    """experts | rank | both | uniform: what varies across the plan's layers."""
    layers = [layer for layer in the_plan.layers if layer["experts"] > 0]
    experts = {layer["experts"] for layer in layers}
    profiles = {tuple(sorted((m["role"], m["rank"]) for m in layer["modules"])) for layer in layers}
    varies_rank = len(profiles) > 1 or any(len({rank for _, rank in profile}) > 1 for profile in profiles)
    if len(experts) > 1:
        return "both" if varies_rank else "experts"
    return "rank" if varies_rank else "uniform"


def one_expert_lora(the_plan: Plan) -> bool:
    """One LoRA expert on every planned module: a plan PEFT's LoraConfig expresses exactly."""
    return the_plan.document["expert_type"] == "lora" and all(layer["experts"] <= 1 for layer in the_plan.layers)


def _baselines(model: str, arms: list[Arm], settings: PlanSettings, peft: bool = False) -> list[Arm]:
    built: dict[str, Arm] = {}
    for arm in arms:
        if arm.kind != "strategy":
            continue
        baseline = like_for_like(model, arm.plan, settings)
        if peft and one_expert_lora(baseline.plan):
            baseline = _through_peft(baseline)
        key = _layers_digest(baseline.plan, baseline.trainer)
        if key not in built:
            built[key] = baseline
        built[key].compared.append(arm.name)
        arm.baseline = built[key].name
    return list(built.values())


def like_for_like(model: str, the_plan: Plan, settings: PlanSettings) -> Arm:
    """The uniform plan of the same structure as ``the_plan`` (see the module docstring)."""
    layers = [layer for layer in the_plan.layers if layer["experts"] > 0]
    total = sum(layer["experts"] for layer in layers)
    top_k = max(layer["top_k"] for layer in layers)
    kind = structure(the_plan)
    shared = dict(target_roles=_roles(the_plan), expert_type=the_plan.document["expert_type"], lora=_lora(the_plan),
                  progress=False)
    if kind == "experts" or kind == "uniform":
        rank = layers[0]["rank"]
        baseline = plan(model, "mola", shape="□", total_experts=total, rank=rank, top_k=top_k,
                        command="compare-plans: like-for-like baseline", **shared)
        name = _uniform_name(baseline)
        how = (f"same {counted(total, 'expert')} spread evenly over {counted(len(layers), 'layer')} (MoLA □), rank "
               f"{rank}, top-{top_k}")
    else:
        experts = layers[0]["experts"] if kind == "rank" else max(1, round(total / len(layers)))
        baseline = _closest_rank(model, the_plan.accounting["trainable"]["total"], experts, top_k, shared)
        name = _uniform_name(baseline)
        how = (f"same {counted(experts, 'expert')} per layer and top-{top_k}, one rank ({baseline.layers[0]['rank']}) at the "
               "closest trainable parameters")
    _check_tolerance(name, baseline, the_plan, settings.tolerance)
    return Arm(name, baseline, "baseline", built=how)


def _closest_rank(model: str, target: int, experts: int, top_k: int, shared: dict) -> Plan:
    """The uniform rank whose trainable parameters are closest to ``target`` (costs grow with rank)."""
    def at(rank: int) -> Plan:
        return plan(model, "uniform", experts=experts, rank=rank, top_k=min(top_k, experts),
                    command="compare-plans: like-for-like baseline", **shared)

    low, high = 1, 2
    while at(high).accounting["trainable"]["total"] < target and high < 1 << 16:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if at(mid).accounting["trainable"]["total"] < target:
            low = mid
        else:
            high = mid
    candidates = [at(low), at(high)]
    return min(candidates, key=lambda p: abs(p.accounting["trainable"]["total"] - target))


def _through_peft(arm: Arm) -> Arm:
    rank = arm.plan.layers[0]["rank"]
    return Arm(f"peft-lora-r{rank}", arm.plan, arm.kind, built=f"{arm.built}; trained through PEFT's LoraConfig",
               trainer="peft")


def _adalora_arms(model: str, arms: list[Arm], settings: PlanSettings) -> list[Arm]:
    """AdaLoRA at the comparison's budget, and its baseline (reused when a rank strategy already has it)."""
    first = next((arm for arm in arms if arm.kind == "strategy"), None)
    if settings.budget_params is not None:
        target, source = settings.budget_params, "--budget-params"
    elif first is not None:
        target, source = first.trainable, f"{first.name}'s trainable parameters"
    else:
        reference = plan(model, "mola", shape="□", total_experts=EXPERTS_PER_LAYER * len(
            _plan(model, "uniform", settings, {}, "depth", budget=False).layers), rank=8, top_k=2,
            target_roles=settings.target_roles, expert_type="lora", progress=False,
            command="compare-plans: reference budget")
        target, source = int(reference.accounting["trainable"]["total"]), "5 rank-8 experts per layer"
    shared = dict(target_roles=_roles(first.plan) if first else settings.target_roles, expert_type="lora",
                  lora=_lora(first.plan) if first else None, progress=False)
    uniform_plan = _closest_rank(model, target, 1, 1, {k: v for k, v in shared.items() if v is not None})
    rank = uniform_plan.layers[0]["rank"]
    baseline = Arm(f"peft-lora-r{rank}", uniform_plan, "baseline", trainer="peft",
                   built=f"one rank-{rank} LoRA per module through PEFT, at {source} ({target:,})")
    existing = next((arm for arm in arms if arm.kind == "baseline" and
                     _layers_digest(arm.plan, arm.trainer) == _layers_digest(baseline.plan, "peft")), None)
    adalora = Arm(ADALORA, uniform_plan, "strategy", baseline=(existing or baseline).name, trainer="adalora",
                  built=f"PEFT AdaLoRA, target_r {rank} (final budget = {(existing or baseline).name}), init_r "
                        f"≈ 1.5 × target_r, tinit 10 % / tfinal 20 % of the steps")
    if existing is not None:
        existing.compared.append(ADALORA)
        return [adalora]
    baseline.compared.append(ADALORA)
    return [adalora, baseline]


def _dense_arm(model: str, arms: list[Arm], settings: PlanSettings) -> Arm:
    strategy = next(arm for arm in arms if arm.kind == "strategy")
    target = strategy.trainable
    shared = dict(target_roles=_roles(strategy.plan), expert_type="lora", lora=_lora(strategy.plan), progress=False)
    dense = _closest_rank(model, target, 1, 1, shared)
    rank = dense.layers[0]["rank"]
    _check_tolerance(DENSE, dense, strategy.plan, settings.tolerance)
    trainer = "peft" if settings.peft_rank_arms or any(arm.trainer == "adalora" for arm in arms) else "layerscope"
    return Arm(DENSE, dense, "dense", baseline=strategy.baseline, trainer=trainer,
               built=f"one rank-{rank} LoRA per module at {strategy.name}'s trainable parameters (mixture vs dense: "
                     "compared with the mixture baseline, not part of the plan verdict)")


def _check_tolerance(name: str, baseline: Plan, the_plan: Plan, tolerance: float) -> None:
    target = the_plan.accounting["trainable"]["total"]
    got = baseline.accounting["trainable"]["total"]
    if abs(got - target) > tolerance * target:
        raise LayerscopeError(
            f"the like-for-like baseline {name} trains {got:,} parameters, the {the_plan.strategy['name']} plan "
            f"{target:,} ({(target - got) / got:+.1%} against the baseline), beyond --budget-tolerance "
            f"{tolerance:.0%}: no uniform "
            "rank matches this plan closely enough (choose ranks whose mean is a whole number, e.g. "
            "--option hilo.ranks=2,4,6 on a 6-layer model, or widen the tolerance)")


def _uniform_name(the_plan: Plan) -> str:
    layers = [layer for layer in the_plan.layers if layer["experts"] > 0]
    experts = sorted({layer["experts"] for layer in layers})
    rank = layers[0]["rank"]
    top_k = max(layer["top_k"] for layer in layers)
    count = f"{experts[0]}x-" if len(experts) == 1 else f"{sum(layer['experts'] for layer in layers)}total-"
    return f"uniform-{count}r{rank}-top{top_k}"


def _roles(the_plan: Plan) -> list[str]:
    return list(the_plan.document["target_roles"])


def _lora(the_plan: Plan):
    from layerscope.planning.plan import LoraSettings

    lora = the_plan.document["lora"]
    return LoraSettings(alpha_scale=lora["alpha_scale"], fixed_alpha=lora["fixed_alpha"], dropout=lora["dropout"],
                        init=lora["init"], router_aux_loss_coef=lora["router_aux_loss_coef"])


def _layers_digest(the_plan: Plan, trainer: str = "layerscope") -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps([the_plan.document["layers"], the_plan.document["expert_type"],
                                      the_plan.document["lora"], trainer], sort_keys=True).encode()).hexdigest()
