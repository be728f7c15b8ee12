"""``compare_plans``: do plans beat the uniform one on this model and task, at one trainable-parameter budget?

Every plan (files, or strategy names planned here at ``budget_params``) is trained with every seed;
each finished run is stored at once under ``out/runs/`` keyed by everything that determines it, so an
interrupted comparison resumes where it stopped and a finished one is not retrained.  The document
(``layerscope.plan-comparison/1``) holds per plan the metric's mean, standard deviation and 95 %
interval over seeds, the paired difference to uniform with a paired t-test, the parameter counts,
seconds per step, peak memory and the evaluation curves, and one sentence that says which plans
beat uniform, or that none did.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.experiments import stats
from layerscope.experiments.runs import Settings, higher_is_better, metric_name, train_run
from layerscope.experiments.task import Task
from layerscope.names import STRATEGIES
from layerscope.outputs import write_files
from layerscope.planning import Plan, plan
from layerscope.planning.matching import checkpoint_shapes, plan_difference, require_same_model

SCHEMA = "layerscope.plan-comparison/1"
UNIFORM = "uniform"


def compare_plans(model: str | Path, task: Task, plans: list[str | Path], *, seeds: list[int], settings: Settings,
                  out: str | Path, budget_params: int | None = None, budget_tolerance: float = 0.05,
                  progress: bool = True) -> dict:
    """Train every plan with every seed (resuming stored runs); write and return the comparison document."""
    settings.check()
    if not seeds or len(set(seeds)) != len(seeds):
        raise LayerscopeError(f"--seeds {seeds}: give one or more distinct seeds")
    model, out = str(model), Path(out)
    named = resolve_plans(model, plans, budget_params, budget_tolerance)
    runs_dir = out / "runs"
    records: dict[str, list[dict]] = {name: [] for name in named}
    todo = [(name, seed) for seed in seeds for name in named]
    from tqdm.auto import tqdm

    for name, seed in tqdm(todo, desc="runs", unit="run", disable=(not progress) or None):
        the_plan = named[name]
        key = run_key(model, the_plan, task, seed, settings)
        stored = runs_dir / f"{_safe(name)}__seed{seed}.json"
        record = _stored(stored, key)
        if record is None:
            record = {"key": key, "plan": name, **train_run(model, the_plan, task, seed, settings)}
            runs_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(record, indent=1)
            write_files({stored: lambda tmp, text=text: tmp.write_text(text)}, "--out")
        records[name].append(record)
    document = _document(model, task, named, records, seeds, settings)
    _write_outputs(out, document)
    return document


def resolve_plans(model: str, plans: list[str | Path], budget_params: int | None, tolerance: float) -> dict[str, Plan]:
    """Plan files as they are (checked against the model), strategy names planned at one budget; uniform added
    when missing.  Refuses budgets that differ by more than ``tolerance``, saying by how much."""
    if not plans:
        raise LayerscopeError("--plans: give two or more plans (files or strategy names)")
    budget = budget_params or _uniform_budget(model)
    shapes, num_layers, fingerprint = checkpoint_shapes(model)
    named: dict[str, Plan] = {}
    for item in plans:
        if str(item) in STRATEGIES:
            named[str(item)] = plan(model, str(item), budget_params=budget, progress=False,
                                    command=f"compare-plans: {item} at --budget-params {budget}")
        else:
            path = Path(item)
            loaded = Plan.load(path)
            require_same_model(plan_difference(loaded, shapes, num_layers, fingerprint, model), str(path), False)
            named[path.stem] = loaded
    if UNIFORM not in named:
        named[UNIFORM] = plan(model, UNIFORM, budget_params=budget, progress=False,
                              command=f"compare-plans: uniform baseline at --budget-params {budget}")
    if len(named) < 2:
        raise LayerscopeError("--plans: a comparison needs a plan besides uniform")
    reference = named[UNIFORM].accounting["trainable"]["total"]
    for name, the_plan in named.items():
        trainable = the_plan.accounting["trainable"]["total"]
        if abs(trainable - reference) > tolerance * reference:
            raise LayerscopeError(f"plan {name!r} trains {trainable:,} parameters, uniform {reference:,}: "
                                  f"{(trainable - reference) / reference:+.1%}, beyond --budget-tolerance "
                                  f"{tolerance:.0%} (plan them at one --budget-params)")
    return named


DEFAULT_BUDGET_RATIO = 4  # x one rank-8 LoRA per target module: room to allocate (at 1x every strategy is one rank-8 expert)


def _uniform_budget(model: str) -> int:
    """The default budget: four times what one rank-8 LoRA on every target module trains."""
    return DEFAULT_BUDGET_RATIO * plan(model, UNIFORM, progress=False).accounting["trainable"]["total"]


def run_key(model: str, the_plan: Plan, task: Task, seed: int, settings: Settings) -> str:
    """Everything that determines a run: model tensors, plan, task rows, seed, training settings."""
    parts = {"model": the_plan.model["fingerprint"], "plan": _digest(the_plan.document.get("layers")),
             "lora": the_plan.document.get("lora"), "task": _digest([task.kind, task.train_texts, task.train_labels,
                                                                    task.eval_texts, task.eval_labels]),
             "seed": seed, "settings": asdict(settings)}
    return _digest(parts)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stored(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: run it again
    return record if record.get("key") == key else None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _document(model: str, task: Task, named: dict[str, Plan], records: dict[str, list[dict]], seeds: list[int],
              settings: Settings) -> dict:
    higher = higher_is_better(task)
    by_seed = {name: {r["seed"]: r for r in runs} for name, runs in records.items()}
    uniform = [by_seed[UNIFORM][s]["final"] for s in seeds]
    rows, pairs = [], {}
    for name, the_plan in named.items():
        finals = [by_seed[name][s]["final"] for s in seeds]
        summary = stats.summarise(finals)
        runs = [by_seed[name][s] for s in seeds]
        row = {"plan": name, "strategy": the_plan.strategy["name"], "n": summary.n, "mean": summary.mean,
               "sd": summary.sd, "ci95_low": summary.ci_low, "ci95_high": summary.ci_high,
               "trainable": the_plan.accounting["trainable"]["total"],
               "active_per_token": the_plan.accounting["active_per_token"]["total"],
               "trainable_in_model": runs[0]["trainable_adapters"], "head": runs[0]["trainable_head"],
               "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / len(runs),
               "peak_memory_mib": max(r["peak_memory_mib"] for r in runs), "finals": finals}
        if name != UNIFORM:
            pair = stats.paired(finals, uniform)
            pairs[name] = pair
            row.update(diff_vs_uniform=pair.mean_difference, diff_ci95_low=pair.ci_low, diff_ci95_high=pair.ci_high,
                       paired_t=pair.t, p_value=pair.p_value)
        rows.append(row)
    budget = named[UNIFORM].accounting["trainable"]["total"]
    return {"schema": SCHEMA, "model": model, "task": task.describe(), "metric": metric_name(task),
            "higher_is_better": higher, "seeds": seeds, "settings": asdict(settings), "budget": budget,
            "verdict": stats.verdict(pairs, higher, budget, len(seeds)), "plans": _jsonable(rows),
            "curves": {name: {str(r["seed"]): r["curve"] for r in runs} for name, runs in records.items()},
            "plan_documents": {name: p.document for name, p in named.items()}}


def _jsonable(rows: list[dict]) -> list[dict]:
    import math

    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()} for row in rows]


def results_table(document: dict) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in row.items() if k != "finals"} for row in document["plans"]])


def _write_outputs(out: Path, document: dict) -> None:
    from layerscope.viz.plots import plot_eval_curves, save_to

    figure = plot_eval_curves(document)
    table = results_table(document)
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    write_files({out / "comparison.json": lambda tmp: tmp.write_text(text, encoding="utf-8"),
                 out / "results.csv": lambda tmp: table.to_csv(tmp, index=False),
                 out / "curves.png": lambda tmp: save_to(figure, tmp)})
