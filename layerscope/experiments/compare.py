"""``compare_plans``: does each strategy beat the uniform plan of its own structure, on this model and task?

The arms (:mod:`layerscope.experiments.arms`): every strategy, the like-for-like uniform baseline it is
paired with, and optionally a dense single LoRA of equal trainable parameters.  The protocol:

1. the learning rate is chosen on the *validation* rows: with ``lr_sweep``, the first baseline arm
   trains at each rate with ``sweep_seeds``, and the rate with the best mean final validation metric is
   used by every arm (chosen for the baseline, so a tuning advantage, if any, is the baseline's);
2. every arm trains with every seed, the same batches in the same order per seed, the same head and
   steps; each finished run is stored at once under ``out/runs/`` keyed by everything that determines
   it (model tensors, the whole plan, task rows, seed, settings), so an interrupted comparison resumes;
3. the *test* rows are scored once per run, at the end; nothing is chosen with them;
4. per arm: mean, sd and a 95 % interval over seeds, collapsed runs; per strategy: the paired difference
   to its baseline with interval, p-value, Holm-corrected p and the minimum detectable effect at 80 %
   power (:mod:`layerscope.experiments.stats`); and whether the baseline's validation curve had flattened.

With ``budgets`` (:mod:`layerscope.experiments.budgets`) every arm is fitted at each budget; the
learning rate is chosen per budget for that budget's first baseline, Holm's correction runs within a
budget (each budget answers its own question: "at this budget, which allocation?"), and ``budgets.png``
draws the metric against trainable parameters, one line per arm.  Under torchrun the runs are shared
out between the ranks (:mod:`layerscope.experiments.distributed`) and rank 0 writes the comparison.

The document is ``layerscope.plan-comparison/2``; progress goes to stderr as one timestamped line per run
and per evaluation (on a terminal or not: a comparison can take hours, and a log file should show it); the run store is :mod:`layerscope.experiments.store`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.experiments import distributed, stats
from layerscope.experiments.arms import Arm, PlanSettings, build_arms, refuse_value_seeds, structure
from layerscope.experiments.budgets import Budget, arms_at_budgets, reference_budget, resolve
from layerscope.experiments.runs import Settings, check_model_for_task, higher_is_better, metric_name
from layerscope.experiments.store import Log, RunStore, arm_key
from layerscope.experiments.task import Task
from layerscope.outputs import write_files

SCHEMA = "layerscope.plan-comparison/2"
FLAT_SHARE = 0.1  # the baseline's curve has flattened when its last quarter moved < 10 % of its whole change


@dataclass
class _Group:
    """The arms of one budget (one group without ``--budgets``), the settings they train with, the rate chosen."""

    budget: Budget | None
    arms: list[Arm]
    settings: Settings
    selection: dict | None = None
    arm_rates: dict[str, float] = field(default_factory=dict)  # with --lr-per-arm: each arm's own chosen rate

    @property
    def label(self) -> str | None:
        return self.budget.label if self.budget else None

    def settings_for(self, arm: Arm) -> Settings:
        rate = self.arm_rates.get(arm.name)
        return self.settings if rate is None else replace(self.settings, learning_rate=rate)


def compare_plans(model: str | Path, task: Task, plans: list[str | Path], *, seeds: list[int], settings: Settings,
                  out: str | Path, plan_settings: PlanSettings | None = None, lr_sweep: list[float] | None = None,
                  sweep_seeds: list[int] | None = None, progress: bool = True,
                  budgets: list[float] | None = None, lr_per_arm: bool = False) -> dict:
    """Train every arm with every seed (resuming stored runs); write and return the comparison document.

    ``budgets``: ratios of the reference budget, or trainable-parameter counts (see
    :mod:`layerscope.experiments.budgets`); every arm is fitted and trained at each.  ``lr_per_arm``: every arm
    sweeps ``lr_sweep`` and trains at its own best rate on the validation rows (instead of the first baseline's)."""
    settings.check()
    if not seeds or len(set(seeds)) != len(seeds):
        raise LayerscopeError(f"--seeds {seeds}: give one or more distinct seeds")
    _check_sweep(lr_sweep, lr_per_arm)
    model, out = str(model), Path(out)
    check_model_for_task(model, task)
    world = distributed.join()
    try:
        log = Log(progress, world)
        groups, budget_record, store = _arms_and_store(model, task, plans, settings, out, plan_settings, budgets,
                                                       world, log)
        refuse_value_seeds([arm for group in groups for arm in group.arms], seeds)
        if lr_sweep:
            _sweep(groups, lr_sweep, sweep_seeds or seeds[:1], store, log, world, lr_per_arm)
        todo = _todo(groups, seeds)
        for number, (group, arm, seed) in enumerate(todo, 1):
            if world.owns(number - 1):
                store.run(arm, seed, group.settings_for(arm), log, f"run {number}/{len(todo)}")
        world.barrier()
        records = {arm.name: [store.load(arm, seed, group.settings_for(arm)) for seed in seeds]
                   for group in groups for arm in group.arms}
        document = _document(model, task, groups, records, seeds, budget_record)
        if world.is_main:
            _write_outputs(out, document)
        world.barrier()
        return document
    finally:
        distributed.leave(world)


def planned_runs(model: str | Path, task: Task, plans: list[str | Path], *, seeds: list[int], settings: Settings,
                 out: str | Path, plan_settings: PlanSettings | None = None, lr_sweep: list[float] | None = None,
                 sweep_seeds: list[int] | None = None, progress: bool = True,
                 budgets: list[float] | None = None, lr_per_arm: bool = False) -> pd.DataFrame:
    """What :func:`compare_plans` would train with the same arguments, without training: one row per run (the
    learning-rate sweep's first, then every arm with every seed) with its budget, arm, kind, baseline, trainer,
    trainable parameters, seed, learning rate and whether ``out/runs`` already holds it.  ``from_sweep`` marks
    the comparison's runs that are the sweep's run at the chosen rate (one run, listed in both phases), and
    ``attrs["left_out"]`` holds the arms a budget curve leaves out, with why.

    The arms are built exactly as for the comparison (task signals such as ``sensitivity`` are measured and
    stored under ``out`` if they are not there yet).  While a sweep is unfinished the comparison's rate is not
    known: those rows have ``learning_rate`` None and ``stored`` False.  ``seconds_per_step`` is the stored
    run's own, for sizing what is left; ``key`` and ``path`` are the run's store key and file."""
    settings.check()
    _check_sweep(lr_sweep, lr_per_arm)
    model, out = str(model), Path(out)
    check_model_for_task(model, task)
    log = Log(progress)
    groups, budget_record, store = _arms_and_store(model, task, plans, settings, out, plan_settings, budgets,
                                                   distributed.World(), log)
    refuse_value_seeds([arm for group in groups for arm in group.arms], seeds)
    rows = []
    swept_seeds = set(sweep_seeds or seeds[:1]) if lr_sweep else set()
    if lr_sweep:
        for group in groups:
            for arm in _swept_arms(group, lr_per_arm):
                for rate in lr_sweep:
                    for seed in sweep_seeds or seeds[:1]:
                        rows.append(_planned_row("lr sweep", group, arm, seed,
                                                 replace(group.settings, learning_rate=rate), store))
        swept = all(row["stored"] for row in rows)
        for group in groups:
            if swept:
                _choose_rates(group, lr_sweep, sweep_seeds or seeds[:1], store, log, lr_per_arm)
            else:
                group.settings = replace(group.settings, learning_rate=math.nan)
                group.arm_rates = {}
    for group, arm, seed in _todo(groups, seeds):
        row = _planned_row("comparison", group, arm, seed, group.settings_for(arm), store)
        row["from_sweep"] = arm in _swept_arms(group, lr_per_arm) and seed in swept_seeds
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["left_out"] = (budget_record or {}).get("left_out", [])
    return table


def _check_sweep(lr_sweep: list[float] | None, lr_per_arm: bool) -> None:
    if lr_sweep is not None and (not lr_sweep or any(not (lr > 0 and math.isfinite(lr)) for lr in lr_sweep)):
        raise LayerscopeError(f"--lr-sweep {lr_sweep}: give one or more finite learning rates > 0")
    if lr_per_arm and not lr_sweep:
        raise LayerscopeError("--lr-per-arm needs --lr-sweep (the rates every arm tries on the validation rows)")


def _planned_row(phase: str, group: _Group, arm: Arm, seed: int, settings: Settings, store: RunStore) -> dict:
    known = math.isfinite(settings.learning_rate)
    stored = store.find(arm, seed, settings) if known else None
    return {"phase": phase, "budget": group.label, "arm": arm.name, "kind": arm.kind, "baseline": arm.baseline,
            "trainer": arm.trainer, "trainable": arm.trainable, "seed": seed,
            "learning_rate": settings.learning_rate if known else None, "stored": stored is not None,
            "seconds_per_step": stored["seconds_per_step"] if stored else None, "from_sweep": False,
            "key": arm_key(arm, store.task, seed, settings) if known else None,
            "path": str(store.path(arm, seed, settings)) if known else None}


def _arms_and_store(model: str, task: Task, plans: list, settings: Settings, out: Path,
                    plan_settings: PlanSettings | None, budgets: list[float] | None, world: distributed.World,
                    log: Log) -> tuple[list[_Group], dict | None, RunStore]:
    """The comparison's arms by budget (task signals measured first where a strategy needs them) and its run
    store."""
    from layerscope.experiments.signals import with_task_signals

    names = [str(item) for item in plans]
    plan_settings = with_task_signals(model, task, names, plan_settings or PlanSettings(), out=out,
                                      batch_size=settings.batch_size, max_length=settings.max_length,
                                      device=settings.device, world=world, log=log)
    groups, budget_record = _groups(model, plans, plan_settings, settings, budgets)
    return groups, budget_record, RunStore(out / "runs", model, task)


def _todo(groups: list[_Group], seeds: list[int]) -> list[tuple[_Group, Arm, int]]:
    """Every arm with every seed, seed by seed within a budget (so an interrupted comparison holds whole pairs)."""
    return [(group, arm, seed) for group in groups for seed in seeds for arm in group.arms]


def _groups(model: str, plans: list, plan_settings: PlanSettings, settings: Settings,
            budgets: list[float] | None) -> tuple[list[_Group], dict | None]:
    if budgets is None:
        return [_Group(None, build_arms(model, plans, plan_settings), settings)], None
    reference, source = reference_budget(model, plan_settings)
    resolved = resolve(list(budgets), reference)
    arms, left_out = arms_at_budgets(model, [str(p) for p in plans], plan_settings, resolved)
    groups = [_Group(budget, [arm for arm in arms if arm.budget == budget.label], settings) for budget in resolved]
    groups = [group for group in groups if group.arms]
    return groups, {"reference": reference, "reference_source": source,
                    "budgets": [budget.as_dict() for budget in resolved], "left_out": left_out}


def _sweep(groups: list[_Group], rates: list[float], seeds: list[int], store: RunStore, log: Log,
           world: distributed.World, per_arm: bool = False) -> None:
    """Phase 1: the learning-rate sweep of every group's first baseline, or of every arm (shared out under
    torchrun); then the rates are chosen from the stored runs on the validation rows."""
    jobs = [(group, arm, rate, seed) for group in groups for arm in _swept_arms(group, per_arm) for rate in rates
            for seed in seeds]
    for index, (group, arm, rate, seed) in enumerate(jobs):
        if world.owns(index):
            store.run(arm, seed, replace(group.settings, learning_rate=rate), log,
                      f"lr sweep {rate:g}{f' at {group.label}' if group.label else ''}")
    world.barrier()
    for group in groups:
        _choose_rates(group, rates, seeds, store, log, per_arm)


def _sweep_arm(group: _Group) -> Arm:
    return next((arm for arm in group.arms if arm.kind == "baseline"), group.arms[0])


def _swept_arms(group: _Group, per_arm: bool) -> list[Arm]:
    return list(group.arms) if per_arm else [_sweep_arm(group)]


def _choose_rates(group: _Group, rates: list[float], seeds: list[int], store: RunStore, log: Log,
                  per_arm: bool) -> None:
    """The group's rate (its first baseline's best), or with ``per_arm`` every arm's own best, on the validation rows."""
    if not per_arm:
        chosen, record = _best_rate(group, _sweep_arm(group), rates, seeds, store, log)
        group.settings = replace(group.settings, learning_rate=chosen)
        group.selection = {**record, "why": "chosen for the first baseline arm and used by every arm (a tuning "
                                            "advantage goes to the baseline)" + (" of this budget" if group.budget else "")}
        return
    records = {arm.name: _best_rate(group, arm, rates, seeds, store, log) for arm in group.arms}
    group.arm_rates = {name: chosen for name, (chosen, _) in records.items()}
    group.selection = {"chosen": None, "per_arm": {name: record for name, (_, record) in records.items()},
                       "seeds": seeds, "split": "validation",
                       "why": "every arm trains at its own best rate on the validation rows (--lr-per-arm)"}


def _best_rate(group: _Group, arm: Arm, rates: list[float], seeds: list[int], store: RunStore,
               log: Log) -> tuple[float, dict]:
    higher = higher_is_better(store.task)
    scores = {}
    for rate in rates:
        trial = replace(group.settings, learning_rate=rate)
        finals = [store.load(arm, seed, trial)["final_validation"] for seed in seeds]
        scores[rate] = sum(finals) / len(finals)
    chosen = (max if higher else min)(scores, key=lambda rate: scores[rate])
    log.line(f"learning rate {chosen:g} chosen on the validation rows ({arm.name}: "
             + ", ".join(f"{rate:g} → {score:.4f}" for rate, score in scores.items()) + ")")
    return chosen, {"chosen": chosen, "arm": arm.name, "seeds": seeds, "split": "validation",
                    "validation_mean": {f"{rate:g}": score for rate, score in scores.items()}}


def _document(model: str, task: Task, groups: list[_Group], records: dict[str, list[dict]], seeds: list[int],
              budget_record: dict | None) -> dict:
    higher = higher_is_better(task)
    metric = metric_name(task)
    arms = [arm for group in groups for arm in group.arms]
    rows, verdicts, dense_verdicts = [], {}, {}
    for group in groups:
        group_rows, verdict, dense_verdict = _group_rows(task, group, records, seeds, higher, metric)
        rows.extend(group_rows)
        verdicts[group.label] = verdict
        if dense_verdict:
            dense_verdicts[group.label] = dense_verdict
    first = groups[0]
    if budget_record is None:
        verdict, dense = verdicts[None], dense_verdicts.get(None)
        learning_rate = first.selection or {"chosen": first.settings.learning_rate, "why": "given (--lr), not swept"}
    else:
        verdict = " ".join(f"At {label} ({_budget_params(budget_record, label):,} parameters): {text}"
                           for label, text in verdicts.items())
        dense = " ".join(f"At {label}: {text}" for label, text in dense_verdicts.items()) or None
        for entry in budget_record["budgets"]:
            group = next((g for g in groups if g.label == entry["label"]), None)
            entry["arms"] = [arm.name for arm in group.arms] if group else []
            entry["learning_rate"] = group.settings.learning_rate if group and not group.arm_rates else None
            entry["verdict"] = verdicts.get(entry["label"])
        rates = {group.label: group.selection or {"chosen": group.settings.learning_rate,
                                                  "why": "given (--lr), not swept"} for group in groups}
        chosen = {r["chosen"] for r in rates.values()}
        learning_rate = {"chosen": chosen.pop() if len(chosen) == 1 else None, "per_budget": rates,
                         "why": ("chosen per budget for every arm on the validation rows" if first.arm_rates else
                                 "chosen per budget for its first baseline arm on the validation rows")
                         if first.selection else "given (--lr), not swept"}
    return {"schema": SCHEMA, "model": model, "fingerprint": arms[0].plan.model["fingerprint"],
            "task": task.describe(), "metric": metric, "higher_is_better": higher, "seeds": seeds,
            "settings": asdict(first.settings), "learning_rate": learning_rate,
            "budgets": budget_record, "verdict": verdict, "dense_verdict": dense,
            "verdicts": {label: text for label, text in verdicts.items() if label is not None} or None,
            "baseline_convergence": _convergence(arms, records, higher),
            "chance": task.majority_rate() if task.kind == "classification" else None,
            "arms": _jsonable(rows),
            "curves": {name: {str(r["seed"]): r["curve"] for r in runs} for name, runs in records.items()},
            "plan_documents": {arm.name: arm.plan.document for arm in arms}}


def _budget_params(record: dict, label: str) -> int:
    return next(b["params"] for b in record["budgets"] if b["label"] == label)


def _group_rows(task: Task, group: _Group, records: dict[str, list[dict]], seeds: list[int], higher: bool,
                metric: str) -> tuple[list[dict], str, str | None]:
    """One budget's rows (each strategy paired with its baseline, Holm within the budget) and its verdicts."""
    arms = group.arms
    bounds = (0.0, 1.0) if task.kind == "classification" else None
    by_seed = {arm.name: {r["seed"]: r for r in records[arm.name]} for arm in arms}
    finals = {arm.name: [by_seed[arm.name][s]["final"] for s in seeds] for arm in arms}
    pairs = {arm.name: stats.paired(finals[arm.name], finals[arm.baseline])
             for arm in arms if arm.kind in ("strategy", "dense") and arm.baseline}
    pairs = {**pairs, **stats.corrected({name: p for name, p in pairs.items() if _arm(arms, name).kind == "strategy"})}
    rows = []
    for arm in arms:
        runs = [by_seed[arm.name][s] for s in seeds]
        summary = stats.summarise(finals[arm.name], bounds)
        row = {"arm": arm.name, "kind": arm.kind, "strategy": arm.plan.strategy["name"] if arm.trainer != "adalora"
               else "adalora", "structure": structure(arm.plan) if arm.trainer != "adalora" else "rank (learned)",
               "baseline": arm.baseline, "built": arm.built, "trainer": arm.trainer, "budget": group.label,
               "family": arm.family, "compared": [name.rsplit("@", 1)[0] for name in arm.compared] or None,
               "learning_rate": group.settings_for(arm).learning_rate,
               "n": summary.n, "mean": summary.mean, "sd": summary.sd, "ci95_low": summary.ci_low,
               "ci95_high": summary.ci_high, "interval": summary.interval,
               "trainable": arm.trainable, "active_per_token": arm.active,
               "trainable_in_model": runs[0]["trainable_adapters"], "head": runs[0]["trainable_head"],
               "collapsed": sum(bool(r.get("collapsed")) for r in runs),
               "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / len(runs),
               "peak_memory_mib": max(r["peak_memory_mib"] for r in runs), "finals": finals[arm.name],
               "finals_validation": [r["final_validation"] for r in runs]}
        if arm.trainer == "adalora":
            final = [r["adalora_final_params"] for r in runs]
            row["adalora_final_params"] = round(sum(final) / len(final))
        if arm.name in pairs:
            pair = pairs[arm.name]
            row.update(diff_vs_baseline=pair.mean_difference, diff_sd=pair.sd, diff_ci95_low=pair.ci_low,
                       diff_ci95_high=pair.ci_high, paired_t=pair.t, p_value=pair.p_value,
                       p_holm=pair.p_holm if arm.kind == "strategy" else None, mde80=pair.mde,
                       testable=pair.testable, not_testable=pair.reason or None)
        rows.append(row)
    strategy_pairs = {a.name: (a.baseline, pairs[a.name]) for a in arms if a.kind == "strategy" and a.name in pairs}
    dense_pairs = {a.name: (a.baseline, pairs[a.name]) for a in arms if a.kind == "dense" and a.name in pairs}
    verdict = stats.verdict(strategy_pairs, higher, len(seeds), metric)
    dense = stats.verdict(dense_pairs, higher, len(seeds), metric) if dense_pairs else None
    return rows, verdict, dense


def _arm(arms: list[Arm], name: str) -> Arm:
    return next(arm for arm in arms if arm.name == name)


def _convergence(arms: list[Arm], records: dict[str, list[dict]], higher: bool) -> dict:
    """Per baseline: how much its mean validation curve moved in the last quarter of training, against the whole run."""
    out = {}
    for arm in arms:
        if arm.kind != "baseline":
            continue
        curves = [r["curve"] for r in records[arm.name]]
        steps = [point[0] for point in curves[0]]
        mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
        quarter = next(i for i, step in enumerate(steps) if step >= 0.75 * steps[-1])
        whole, last = mean[-1] - mean[0], mean[-1] - mean[quarter]
        flattened = abs(last) <= FLAT_SHARE * abs(whole) if whole else True
        out[arm.name] = {"validation_start": mean[0], "validation_at_75pct": mean[quarter], "validation_end": mean[-1],
                         "last_quarter_change": last, "whole_change": whole, "flattened": flattened}
    return out


def _jsonable(rows: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()} for row in rows]


def results_table(document: dict) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in row.items() if k not in ("finals", "finals_validation")}
                         for row in document["arms"]])


def _write_outputs(out: Path, document: dict) -> None:
    from layerscope.viz.plots import plot_budget_curves, plot_eval_curves, save_to

    figure = plot_eval_curves(document)
    table = results_table(document)
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    files = {out / "comparison.json": lambda tmp: tmp.write_text(text, encoding="utf-8"),
             out / "results.csv": lambda tmp: table.to_csv(tmp, index=False),
             out / "curves.png": lambda tmp: save_to(figure, tmp)}
    if document.get("budgets"):
        budgets = plot_budget_curves(document)
        files[out / "budgets.png"] = lambda tmp: save_to(budgets, tmp)
    write_files(files)
