"""Experiments on the user's task: ``compare-plans`` (each strategy against the uniform plan of its own structure),
``layer-value`` (what capacity in each group of layers is worth), ``sensitivity``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from layerscope.cli.group import _float_list, _int_list, cli
from layerscope.errors import LayerscopeError
from layerscope.outputs import check_writable


def parse_options(values: tuple[str, ...]) -> dict[str, dict]:
    """``alphalora.beta=2`` → {"alphalora": {"beta": 2}}; values are JSON where they parse (numbers, true/false),
    comma lists of numbers become tuples, anything else stays text."""
    options: dict[str, dict] = {}
    for item in values:
        target, sep, value = item.partition("=")
        strategy, dot, key = target.partition(".")
        if not sep or not dot or not strategy or not key:
            raise LayerscopeError(f"--option {item!r}: expected STRATEGY.OPTION=VALUE, e.g. hilo.ranks=2,4,6")
        options.setdefault(strategy, {})[key.replace("-", "_")] = _value(value)
    return options


def _value(text: str):
    if "," in text:
        parts = [_value(part) for part in text.split(",") if part.strip()]
        return tuple(parts)
    try:
        return json.loads(text)
    except ValueError:
        return text


def _stacked(*options):
    """One decorator applying ``options`` in order (the first is the first in --help)."""
    def apply(function):
        for option in reversed(options):
            function = option(function)
        return function
    return apply


_task_options = _stacked(
    click.option("--task", "task_file", type=click.Path(path_type=Path), required=True,
                 help="Training rows: .jsonl, .csv, .parquet, or a datasets save_to_disk folder (a DatasetDict's "
                      "validation and test splits are used)."),
    click.option("--eval-task", "eval_file", type=click.Path(path_type=Path),
                 help="Test rows (default: the DatasetDict's test split, else a seeded --eval-fraction of --task)."),
    click.option("--validation-task", "validation_file", type=click.Path(path_type=Path),
                 help="Validation rows, for the curves and the learning-rate sweep (default: the DatasetDict's "
                      "validation split, else a seeded --validation-fraction of --task)."),
    click.option("--task-kind", type=click.Choice(["classification", "causal-lm"]), default="classification",
                 show_default=True),
    click.option("--text-column", default="text", show_default=True),
    click.option("--label-column", default="label", show_default=True),
    click.option("--prompt-column", help="Causal LM: a context column before --text-column; only the text (the "
                 "completion) is scored, as in instruction tuning."),
    click.option("--eval-fraction", type=float, default=0.2, show_default=True),
    click.option("--validation-fraction", type=float, default=0.15, show_default=True))

_training_options = _stacked(
    click.option("--steps", type=int, default=100, show_default=True),
    click.option("--scheduler", type=click.Choice(["linear", "cosine", "constant"]), default="linear",
                 show_default=True),
    click.option("--warmup-ratio", type=float, default=0.1, show_default=True),
    click.option("--batch-size", type=int, default=16, show_default=True),
    click.option("--eval-every", type=int, default=10, show_default=True),
    click.option("--max-length", type=int, default=64, show_default=True, help="Tokens per row (truncated)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."))


def read_task(task_file: Path, task_kind: str, text_column: str, label_column: str, prompt_column: str | None,
              eval_file: Path | None, validation_file: Path | None, eval_fraction: float, validation_fraction: float):
    from layerscope.experiments import load_task

    return load_task(task_file, task_kind, text_column=text_column, label_column=label_column, eval_path=eval_file,
                     eval_fraction=eval_fraction, validation_path=validation_file,
                     validation_fraction=validation_fraction, prompt_column=prompt_column, seed=0)


@cli.command("compare-plans")
@click.argument("model", type=click.Path(path_type=Path))
@_task_options
@click.option("--plans", "plans", required=True,
              help="Comma-separated strategies (alphalora, mola, hilo, adaptive-lora, sensitivity), 'adalora' "
                   "(PEFT's AdaLoRA against a uniform PEFT LoRA of its final budget) or plan files; each is paired "
                   "with the uniform plan of its own structure.  Add 'dense' for a dense single-LoRA arm.")
@click.option("--option", "options", multiple=True,
              help="A strategy option, STRATEGY.OPTION=VALUE (repeatable), e.g. hilo.ranks=2,4,6 or alphalora.beta=2.")
@click.option("--expert-type", type=click.Choice(["lora", "mor"]), default="lora", show_default=True)
@click.option("--target-roles", help="Comma-separated roles to adapt in every arm (default: every projection).")
@click.option("--budget-params", type=int, help="Fit every strategy to this many trainable parameters (keeping its "
              "shape); by default strategies use their depth-scaled defaults (5 experts per layer for "
              "alphalora and mola).")
@click.option("--budgets", callback=_float_list,
              help="A budget curve: every arm fitted and trained at each budget, given as ratios of the default "
                   "budget (5 rank-8 experts per layer, or --budget-params), e.g. 0.25,1,4, or as trainable "
                   "parameters (values of 1000 and more).  Writes budgets.png.")
@click.option("--budget-tolerance", type=float, default=0.05, show_default=True,
              help="Largest relative difference between a strategy's and its baseline's trainable parameters.")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_int_list)
@click.option("--lr", "learning_rate", type=float, default=1e-3, show_default=True,
              help="Learning rate when no --lr-sweep is given.")
@click.option("--lr-sweep", callback=_float_list,
              help="Learning rates to try on the first baseline arm; the best on the validation rows is used by "
                   "every arm.")
@click.option("--sweep-seeds", callback=_int_list, help="Seeds of the sweep (default: the first of --seeds).")
@click.option("--lr-per-arm", is_flag=True, help="With --lr-sweep: every arm sweeps the rates and trains at its own "
              "best on the validation rows (default: the first baseline's best serves every arm).")
@_training_options
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder: comparison.json, results.csv, curves.png, runs/ (the resume store).")
@click.option("--dry-run", is_flag=True,
              help="Build the arms and list every run (budget, arm, trainable parameters, seed, whether --out/runs "
                   "already holds it) with what is left to train; train nothing, write no comparison.")
@click.option("--quiet", "-q", is_flag=True)
def compare_plans_command(model: Path, task_file: Path, eval_file: Path | None, validation_file: Path | None,
                          task_kind: str, text_column: str, label_column: str, prompt_column: str | None,
                          eval_fraction: float,
                          validation_fraction: float, plans: str, options: tuple[str, ...], expert_type: str,
                          target_roles: str | None, budget_params: int | None, budgets: tuple[float, ...] | None,
                          budget_tolerance: float,
                          seeds: tuple[int, ...], steps: int, learning_rate: float,
                          lr_sweep: tuple[float, ...] | None, sweep_seeds: tuple[int, ...] | None,
                          lr_per_arm: bool, scheduler: str,
                          warmup_ratio: float, batch_size: int, eval_every: int, max_length: int, device: str,
                          out: Path, dry_run: bool, quiet: bool) -> None:
    """Fine-tune each strategy and its like-for-like uniform baseline with each seed on a local task; report each
    arm's test metric, the paired difference to its baseline, and what the data rule out.  A .gguf MODEL is
    converted once to a folder under --out.  Interrupted runs resume from --out/runs.  Under torchrun
    (``torchrun --nproc_per_node N -m layerscope compare-plans …``) each process trains its share of the runs on
    its own device and the first writes the comparison."""
    from layerscope.experiments import PlanSettings, Settings, compare_plans, prepare_model, results_table

    check_writable([out / "comparison.json"])
    task = read_task(task_file, task_kind, text_column, label_column, prompt_column, eval_file, validation_file,
                     eval_fraction, validation_fraction)
    settings = Settings(steps=steps, learning_rate=learning_rate, batch_size=batch_size, eval_every=eval_every,
                        max_length=max_length, device=device, scheduler=scheduler, warmup_ratio=warmup_ratio)
    settings.check()
    roles = [r.strip() for r in target_roles.split(",") if r.strip()] if target_roles else None
    plan_settings = PlanSettings(target_roles=roles, expert_type=expert_type, options=parse_options(options),
                                 budget_params=budget_params, tolerance=budget_tolerance)
    names = [p.strip() for p in plans.split(",") if p.strip()]
    folder = prepare_model(model, out)
    if dry_run:
        from layerscope.experiments import planned_runs

        runs = planned_runs(folder, task, names, seeds=list(seeds), settings=settings, out=out,
                            plan_settings=plan_settings, lr_sweep=list(lr_sweep) if lr_sweep else None,
                            sweep_seeds=list(sweep_seeds) if sweep_seeds else None, progress=not quiet,
                            budgets=list(budgets) if budgets else None, lr_per_arm=lr_per_arm)
        click.echo(_planned_summary(runs, steps))
        return
    document = compare_plans(folder, task, names, seeds=list(seeds), settings=settings, out=out,
                             plan_settings=plan_settings, lr_sweep=list(lr_sweep) if lr_sweep else None,
                             sweep_seeds=list(sweep_seeds) if sweep_seeds else None, progress=not quiet,
                             budgets=list(budgets) if budgets else None, lr_per_arm=lr_per_arm)
    if not quiet and int(os.environ.get("RANK", "0")) == 0:
        table = results_table(document)
        shown = [c for c in ("arm", "kind", "baseline", *(["learning_rate"] if lr_per_arm else []), "n", "mean",
                             "ci95_low", "ci95_high", "diff_vs_baseline",
                             "p_holm", "mde80", "collapsed", "trainable", "active_per_token", "seconds_per_step")
                 if c in table.columns]
        rates = document["learning_rate"].get("per_budget")
        rate = ("per arm (the learning_rate column)" if lr_per_arm else
                ", ".join(f"{label} {entry['chosen']:g}" for label, entry in rates.items()) if rates
                else f"{document['settings']['learning_rate']:g}")
        click.echo(f"{document['metric']} on {len(task.eval_texts)} test rows, {len(seeds)} seeds, {steps} steps, "
                   f"lr {rate}:")
        click.echo(table[shown].to_string(index=False, float_format="%.4f"))
        for note in (document.get("budgets") or {}).get("left_out", []):
            click.echo(f"left out at {note['budget']}: {note['arm']} ({note['why']})")
        click.echo(document["verdict"])
        if document.get("dense_verdict"):
            click.echo(f"Mixture vs dense: {document['dense_verdict']}")
        written = ["comparison.json", "results.csv", "curves.png", *(["budgets.png"] if document.get("budgets") else [])]
        click.echo("wrote " + ", ".join(str(out / name) for name in written))


def _planned_summary(runs, steps: int) -> str:
    """The dry run's table, the arms a budget curve leaves out, and one line of what is left: runs to train and,
    from the stored runs' own seconds per step, about how long they take on this machine."""
    shown = runs.assign(
        learning_rate=runs["learning_rate"].map(lambda v: "by sweep" if v is None or v != v else f"{v:g}"),
        budget=runs["budget"].fillna("—"), baseline=runs["baseline"].fillna("—"),
        stored=[("the sweep's" if reused else "yes" if stored else "no")
                for stored, reused in zip(runs["stored"], runs["from_sweep"])])
    columns = ["phase", *(["budget"] if runs["budget"].notna().any() else []), "arm", "kind", "baseline", "trainer",
               "trainable", "seed", "learning_rate", "stored"]
    notes = [f"left out at {note['budget']}: {note['arm']} ({note['why']})" for note in runs.attrs.get("left_out", [])]
    distinct = runs[~runs["from_sweep"]]
    left = int((~distinct["stored"]).sum())
    line = f"{len(distinct)} runs of {steps} steps: {len(distinct) - left} stored, {left} to train"
    measured = runs["seconds_per_step"].dropna()
    if left and len(measured):
        hours = left * steps * measured.mean() / 3600
        line += (f"; about {hours:.1f} h in one process at the stored runs' mean {measured.mean():.2f} s/step "
                 "(their validation evaluations included, the final test scoring not)")
    return "\n".join([shown[columns].to_string(index=False), *notes, line + " (dry run: nothing trained)"])


@cli.command("layer-value")
@click.argument("model", type=click.Path(path_type=Path))
@_task_options
@click.option("--budget", type=float, required=True,
              help="The uniform plan's budget: a ratio of the default budget (5 rank-8 experts per layer), e.g. "
                   "0.125, or trainable parameters (values of 1000 and more).")
@click.option("--groups", type=int, help="Groups of consecutive layers (default: every layer up to 12 layers, else 6).")
@click.option("--unit", type=click.Choice(["ranks", "experts"]), default="ranks", show_default=True,
              help="What U holds and add g doubles: one LoRA per module at one rank, or experts per layer at the "
                   "budget's expert rank (top-2).")
@click.option("--target-roles", help="Comma-separated roles to adapt (default: every projection).")
@click.option("--seeds", default="100,101,102", show_default=True, callback=_int_list,
              help="Seeds of the value estimate (test an oracle from it with other seeds).")
@click.option("--lr", "learning_rate", type=float, default=1e-3, show_default=True)
@_training_options
@click.option("--no-signals", is_flag=True, help="Skip the signals (scan, sensitivity, near-zero fractions) and "
              "their correlations with value.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder: value.json, value.png, runs/ (the resume store, shareable with compare-plans).")
@click.option("--dry-run", is_flag=True, help="List every run and whether --out/runs holds it; train nothing.")
@click.option("--quiet", "-q", is_flag=True)
def layer_value_command(model: Path, task_file: Path, eval_file: Path | None, validation_file: Path | None,
                        task_kind: str, text_column: str, label_column: str, prompt_column: str | None,
                        eval_fraction: float, validation_fraction: float, budget: float, groups: int | None,
                        unit: str, target_roles: str | None, seeds: tuple[int, ...], learning_rate: float,
                        steps: int, scheduler: str, warmup_ratio: float, batch_size: int, eval_every: int,
                        max_length: int, device: str, no_signals: bool, out: Path, dry_run: bool,
                        quiet: bool) -> None:
    """What extra capacity in each group of layers is worth on your task: the uniform plan U at --budget, U with
    one group's capacity doubled (add g) and U without one group's adapters (drop g), each with every seed, scored
    on the validation rows.  Writes value.json (values with intervals, whether the groups differ at all, every
    signal's rank correlation with value) and value.png.  Plan from it with `plan --strategy value --value
    OUT/value.json`, and bound what any allocation can win with `compare-plans --plans value:OUT/value.json` on
    other seeds."""
    from layerscope.experiments import PlanSettings, Settings, prepare_model
    from layerscope.experiments.value import layer_value, planned_value_runs

    check_writable([out / "value.json"])
    task = read_task(task_file, task_kind, text_column, label_column, prompt_column, eval_file, validation_file,
                     eval_fraction, validation_fraction)
    settings = Settings(steps=steps, learning_rate=learning_rate, batch_size=batch_size, eval_every=eval_every,
                        max_length=max_length, device=device, scheduler=scheduler, warmup_ratio=warmup_ratio)
    roles = [r.strip() for r in target_roles.split(",") if r.strip()] if target_roles else None
    arguments = dict(budget=budget, seeds=list(seeds), settings=settings, out=out, groups=groups, unit=unit,
                     plan_settings=PlanSettings(target_roles=roles))
    folder = prepare_model(model, out)
    if dry_run:
        runs = planned_value_runs(folder, task, **arguments)
        left = int((~runs["stored"]).sum())
        click.echo(runs.drop(columns=["seconds_per_step"]).to_string(index=False))
        click.echo(f"{len(runs)} runs of {steps} steps: {len(runs) - left} stored, {left} to train (dry run)")
        return
    document = layer_value(folder, task, signals=not no_signals, progress=not quiet, **arguments)
    if not quiet and int(os.environ.get("RANK", "0")) == 0:
        click.echo(value_table(document).to_string(index=False, float_format="%.3g"))
        for signal in document["signals"]:
            add = signal["add"]
            click.echo(f"  {signal['signal']:>18}: Spearman with value {add['spearman']:+.2f} "
                       f"[{add['ci95_low']:+.2f}, {add['ci95_high']:+.2f}]" if add["spearman"] is not None
                       else f"  {signal['signal']:>18}: constant over the groups")
        click.echo(document["verdict"])
        click.echo(f"wrote {out / 'value.json'}, {out / 'value.png'}")


def value_table(document: dict):
    """One row per group: its layers, the add and drop values per million parameters with their intervals."""
    import pandas as pd

    rows = []
    for group in document["groups"]:
        row = {"group": group["group"], "layers": ",".join(map(str, group["layers"]))}
        for estimate in ("add", "drop"):
            value = group[estimate]["per_param"]
            row.update({f"{estimate}_per_M": _per_million(value["mean"]),
                        f"{estimate}_ci95": f"[{_per_million(value['ci95_low']):.3g}, "
                                            f"{_per_million(value['ci95_high']):.3g}]"})
        rows.append(row)
    return pd.DataFrame(rows)


def _per_million(value) -> float:
    return float("nan") if value is None else value * 1e6


@cli.command("sensitivity")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--task", "task_file", type=click.Path(path_type=Path), required=True,
              help="The task's rows (.jsonl, .csv, .parquet or a datasets folder), as compare-plans reads them.")
@click.option("--task-kind", type=click.Choice(["classification", "causal-lm"]), default="classification",
              show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--prompt-column", help="Causal LM: a context column before --text-column (not scored).")
@click.option("--batches", type=int, default=8, show_default=True, help="Batches of training rows to average over.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=64, show_default=True, help="Tokens per row (truncated).")
@click.option("--seed", type=int, default=0, show_default=True, help="Which rows, and a new head's initialisation.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the table (.json, .parquet or .csv).")
@click.option("--quiet", "-q", is_flag=True)
def sensitivity_command(model: Path, task_file: Path, task_kind: str, text_column: str, label_column: str,
                        prompt_column: str | None, batches: int, batch_size: int, max_length: int, seed: int,
                        device: str, out: Path | None, quiet: bool) -> None:
    """First-order importance of every target matrix on your own rows, Σ|W ⊙ ∂L/∂W| averaged over a few batches
    (the quantity AdaLoRA tracks while training), and its mean per layer: the input of `plan --strategy
    sensitivity --scores FILE`."""
    from layerscope.activations.sensitivity import layer_sensitivity
    from layerscope.experiments import load_task
    from layerscope.experiments.runs import check_model_for_task
    from layerscope.experiments.signals import measure_sensitivity
    from layerscope.tables import output_format, write_sensitivity

    if out is not None:
        output_format(out)
        check_writable([out])
    task = load_task(task_file, task_kind, text_column=text_column, label_column=label_column,
                     prompt_column=prompt_column, seed=seed)
    check_model_for_task(str(model), task)
    table = measure_sensitivity(model, task, batches=batches, batch_size=batch_size, max_length=max_length,
                                seed=seed, device=device, progress=not quiet)
    if out is not None:
        write_sensitivity(table, out)
    if not quiet:
        click.echo(f"{model}: Σ|W ⊙ ∂L/∂W| over {table.attrs['rows']} training rows of {task_file} "
                   f"({batches} batches of {batch_size}), mean per layer:")
        click.echo(layer_sensitivity(table).to_string(index=False, float_format="%.4g"))
        if out is not None:
            click.echo(f"wrote {out}")
