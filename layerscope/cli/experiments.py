"""``compare-plans``: train plans at one budget on a local task and say whether any beats uniform."""

from __future__ import annotations

from pathlib import Path

import click

from layerscope.cli.group import _int_list, cli
from layerscope.outputs import check_writable


@cli.command("compare-plans")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--task", "task_file", type=click.Path(path_type=Path), required=True,
              help="Training rows: .jsonl, .csv, .parquet, or a datasets save_to_disk folder.")
@click.option("--eval-task", "eval_file", type=click.Path(path_type=Path),
              help="Evaluation rows (default: a seeded --eval-fraction of --task).")
@click.option("--task-kind", type=click.Choice(["classification", "causal-lm"]), default="classification",
              show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--eval-fraction", type=float, default=0.2, show_default=True)
@click.option("--plans", "plans", required=True, help="Comma-separated plan files or strategy names (uniform, "
              "alphalora, mola, hilo, adaptive-lora); names are planned here at --budget-params.")
@click.option("--budget-params", type=int, help="Trainable parameters of every plan planned here (default: 4x one "
              "rank-8 LoRA on every target module; at 1x every strategy is one rank-8 expert per layer).")
@click.option("--budget-tolerance", type=float, default=0.05, show_default=True,
              help="Largest relative difference between two plans' trainable parameters.")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_int_list)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--eval-every", type=int, default=10, show_default=True)
@click.option("--max-length", type=int, default=64, show_default=True, help="Tokens per row (truncated).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder: comparison.json, results.csv, curves.png, runs/ (the resume store).")
@click.option("--quiet", "-q", is_flag=True)
def compare_plans_command(model: Path, task_file: Path, eval_file: Path | None, task_kind: str, text_column: str,
                          label_column: str, eval_fraction: float, plans: str, budget_params: int | None,
                          budget_tolerance: float, seeds: tuple[int, ...], steps: int, learning_rate: float,
                          batch_size: int, eval_every: int, max_length: int, device: str, out: Path,
                          quiet: bool) -> None:
    """Fine-tune each plan with each seed on a local task; report the metric per plan, the paired difference to
    uniform and whether any plan beats it.  Interrupted runs resume from --out/runs."""
    from layerscope.experiments import Settings, compare_plans, load_task, results_table

    check_writable([out / "comparison.json"])
    task = load_task(task_file, task_kind, text_column=text_column, label_column=label_column, eval_path=eval_file,
                     eval_fraction=eval_fraction, seed=0)
    settings = Settings(steps=steps, learning_rate=learning_rate, batch_size=batch_size, eval_every=eval_every,
                        max_length=max_length, device=device)
    settings.check()
    names = [p.strip() for p in plans.split(",") if p.strip()]
    document = compare_plans(model, task, names, seeds=list(seeds), settings=settings, out=out,
                             budget_params=budget_params, budget_tolerance=budget_tolerance, progress=not quiet)
    if not quiet:
        table = results_table(document)
        shown = [c for c in ("plan", "n", "mean", "sd", "ci95_low", "ci95_high", "diff_vs_uniform", "p_value",
                             "trainable", "seconds_per_step") if c in table.columns]
        click.echo(f"{document['metric']} on {len(task.eval_texts)} evaluation rows, {len(seeds)} seeds, "
                   f"{steps} steps:")
        click.echo(table[shown].to_string(index=False, float_format="%.4f"))
        click.echo(document["verdict"])
        click.echo(f"wrote {out / 'comparison.json'}, {out / 'results.csv'}, {out / 'curves.png'}")
