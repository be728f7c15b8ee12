"""Command line: thin click wrappers over the Python API."""

from __future__ import annotations

import inspect
import os
import re
import sys
import time
import unicodedata
from pathlib import Path

import click

from layerscope.errors import LayerscopeError
from layerscope.names import (
    ALL_ESTIMATORS,
    DEFAULT_EPS,
    DEFAULT_REL_EPS,
    EXPORT_FORMATS,
    PRECISIONS,
    RANK_ROUNDINGS,
    SPECTRAL_ESTIMATORS,
    STRATEGIES,
)
from layerscope.outputs import check_writable, write_files

# Each command imports what it needs (torch, pandas, transformers) when it runs, so that
# `layerscope --help` and every `--help` stay fast (tests/test_cli_speed.py).

DEFAULT_DEMO_OUT = Path("layerscope-demo")  # not the committed example under reports/ (regenerated on purpose only)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerscope")
def cli() -> None:
    """Spectral diagnostics and LoRA-expert allocation plans for LLM checkpoints."""


def _split_estimators(_ctx, _param, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in ALL_ESTIMATORS]
    if unknown or not names:
        raise click.BadParameter(f"unknown {unknown or 'none given'}; choose from {', '.join(ALL_ESTIMATORS)}")
    return names


@cli.command("scan")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Write the tables here (.parquet, .csv or .json).")
@click.option("--estimators", default=",".join(SPECTRAL_ESTIMATORS), show_default=True, callback=_split_estimators,
              help=f"Comma-separated estimators, of: {', '.join(ALL_ESTIMATORS)} (see README).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Eigenvalue precision policy (see README).")
@click.option("--include", metavar="REGEX", help="Only tensors whose name matches.")
@click.option("--exclude", metavar="REGEX", help="Skip tensors whose name matches.")
@click.option("--split-fused", is_flag=True, help="Also report the parts of fused qkv / gate_up matrices.")
@click.option("--architecture", help="Force a naming scheme (llama, gpt2, bert, ..., generic).")
@click.option("--revision", help="Hub cache folders (models--org--name): snapshot commit or ref (default: main).")
@click.option("--cache", type=click.Path(path_type=Path), help="Keep each finished tensor's results in this "
              "folder: a killed scan resumes where it stopped, a repeated one is instant.")
@click.option("--base", type=click.Path(path_type=Path), help="Adapter folders: also analyse W + ΔW of this "
              "base model.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no summary.")
def scan_command(path: Path, out: Path | None, estimators: tuple[str, ...], device: str, precision: str,
                 include: str | None, exclude: str | None, split_fused: bool, architecture: str | None,
                 revision: str | None, cache: Path | None, base: Path | None, quiet: bool) -> None:
    """Per-matrix heavy-tailed spectral metrics of a safetensors checkpoint."""
    from layerscope.adapters import scan
    from layerscope.spectral import distributed
    from layerscope.spectral.scan import ScanOptions, layer_summary
    from layerscope.tables import scan_outputs, write_scan

    group = distributed.current(device)  # torchrun: this process is one rank of several
    writer = group is None or group.rank == 0

    def preflight() -> None:  # a bad suffix or an unwritable place fails before the work
        if out is not None and writer:
            check_writable(scan_outputs(out))

    preflight() if group is None else group.run(preflight)
    started = time.perf_counter()
    options = ScanOptions(estimators=estimators, device=device, precision=precision, include=include,
                          exclude=exclude, split_fused=split_fused, architecture=architecture,
                          revision=revision, cache=cache, base=base, progress=not quiet)
    matrices = scan(path, **options.__dict__)
    if not writer:
        return  # rank 0 writes and reports the gathered table
    layers = layer_summary(matrices)
    written = write_scan(matrices, layers, out) if out is not None else []
    if not quiet:
        _print_summary(matrices, layers, time.perf_counter() - started, written)


def _print_summary(matrices, layers, seconds: float, written: list[Path]) -> None:
    attrs = matrices.attrs
    failed = int((matrices["status"] != "ok").sum())
    click.echo(
        f"{attrs['path']}: {attrs.get('architecture') or attrs.get('model_type') or 'unknown architecture'}, "
        f"naming={attrs['naming']}, {attrs.get('num_layers')} layers, {len(matrices)} matrices "
        f"({failed} not analysable) in {seconds:.1f} s on {attrs['device']}"
    )
    if attrs["naming"] == "generic":
        click.echo(f"WARNING: {attrs.get('model_type') or 'this architecture'} is not in layerscope's naming table: "
                   "layers were found with the generic '.N.' rule and every block matrix is treated as a "
                   "projection; check the table (or pass --architecture) before planning", err=True)
    unmapped = attrs.get("unmapped") or []
    if unmapped:
        shown = ", ".join(one_line(m) for m in unmapped[:5]) + (" ..." if len(unmapped) > 5 else "")
        click.echo(f"WARNING: {len(unmapped)} Linear layers inside the blocks have no known role (kind 'other', left "
                   f"out of the layer means; plan refuses them without --allow-unmapped): {shown}", err=True)
    if attrs.get("towers"):
        click.echo(f"towers (own stacks, not planned unless --include-towers): {', '.join(attrs['towers'])}")
    if attrs.get("cache"):
        cache = attrs["cache"]
        click.echo(f"cache {cache['folder']}: {cache['reused']} tensors reused, {cache['computed']} computed")
    if attrs.get("quantization"):
        click.echo(f"dequantized from: {', '.join(attrs['quantization'])} (see the quantization column)")
    cols = [c for c in ("alpha", "alpha_hill", "alpha_peak") if c in layers.columns]
    if len(layers):
        where = [c for c in ("stack", "stack_layer", "mixer") if c in layers.columns and layers[c].nunique() > 1]
        click.echo(layers[["layer", *where, "num_matrices", *cols]].fillna({"mixer": "-"}).to_string(index=False, float_format="%.3f"))
    for path in written:
        click.echo(f"wrote {path}")


def _int_list(_ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers like 2,4,6,8") from None
    if not numbers:
        raise click.BadParameter("empty list")
    return numbers


@cli.command("plan")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--strategy", type=click.Choice(STRATEGIES), default="alphalora", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the plan JSON here.")
@click.option("--total-experts", type=int, help="alphalora/mola: experts over all layers (alphalora default 160).")
@click.option("--beta", type=float, help="alphalora: exponent of alpha (default 2.5).")
@click.option("--metric", help="alphalora: scan column averaged per layer (default alpha_peak).")
@click.option("--rounding", type=click.Choice(["largest-remainder", "reference"]),
              help="alphalora: sound rounding (default) or the reference code's np.round + fix-up.")
@click.option("--min-experts", type=int, help="alphalora: per-layer minimum (default 1).")
@click.option("--max-experts", type=int, help="alphalora: per-layer maximum.")
@click.option("--rank", type=int, help="alphalora/mola/uniform: LoRA rank (default 8).")
@click.option("--top-k", type=int, help="Experts routed per token (default 2; 1 where a layer has 1).")
@click.option("--shape", help="mola: ▽ △ ⋈ □ or increasing, decreasing, hourglass, uniform (default ▽).")
@click.option("--pattern", callback=_int_list, help="mola: experts per depth group, e.g. 2,4,6,8.")
@click.option("--ranks", callback=_int_list, help="hilo: rank tiers from shallow to deep (default 2,4,6,8).")
@click.option("--experts", type=int, help="hilo/uniform: experts per layer (hilo 8, uniform 1).")
@click.option("--rank-source", type=click.Choice(["depth", "activations"]), help="hilo: tiers by depth (default) "
              "or by near-zero fraction.")
@click.option("--activations", type=click.Path(path_type=Path), help="hilo: table with layer, near_zero_fraction.")
@click.option("--experts-mode", type=click.Choice(["fixed", "inverse-rank"]),
              help="hilo: fixed experts, or experts ∝ 1/rank at the uniform reference's parameter count.")
@click.option("--mode", type=click.Choice(["linear-decay", "attention-heavy", "empirical"]), help="adaptive-lora.")
@click.option("--base-rank", type=int, help="adaptive-lora: r_base (default 16).")
@click.option("--min-rank", type=int, help="adaptive-lora: r_min (default 4).")
@click.option("--max-rank", type=int, help="adaptive-lora: r_max (default 32).")
@click.option("--budget-params", type=int, help="Trainable-parameter budget (adapters + routers).")
@click.option("--budget-ratio", type=float, help="Budget as a multiple of one rank-r LoRA on every target module.")
@click.option("--reference-rank", type=int, default=8, show_default=True, help="r of the uniform baselines.")
@click.option("--reference-experts", type=int, default=8, show_default=True, help="Experts of the uniform MoE baseline.")
@click.option("--target-roles", help="Comma-separated roles to adapt (default: every projection).")
@click.option("--expert-type", type=click.Choice(["lora", "mor"]), default="lora", show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True,
              help="lora_alpha of every module (MoLA/AlphaLoRA train with 16).")
@click.option("--alpha-scale", type=float, help="Instead: lora_alpha = scale x rank (constant alpha/r).")
@click.option("--dropout", type=float, default=0.05, show_default=True)
@click.option("--init", type=click.Choice(["kaiming-uniform", "gaussian"]), default="kaiming-uniform",
              show_default=True, help="Initialisation of A (B starts at zero).")
@click.option("--aux-loss-coef", type=float, default=0.0, show_default=True,
              help="Load-balancing loss coefficient for the runtime (0 = off; Mixtral uses 0.001).")
@click.option("--optimizer", help="Per-layer optimizer multipliers: tempbalance (lr), alphadecay (weight "
              "decay), or both comma-separated.")
@click.option("--optimizer-metric", default="alpha_hill", show_default=True,
              help="Scan column the optimizer multipliers follow.")
@click.option("--include-towers", is_flag=True, help="Also plan the vision/audio towers' blocks (default: the "
              "language model only).")
@click.option("--allow-unmapped", is_flag=True, help="Plan a model whose blocks hold Linear layers of no known role "
              "(they get no adapters).")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def plan_command(ctx: click.Context, source: Path, strategy: str, out: Path | None, budget_params: int | None,
                 budget_ratio: float | None, reference_rank: int, reference_experts: int, target_roles: str | None,
                 expert_type: str, lora_alpha: float, alpha_scale: float | None, dropout: float, init: str,
                 aux_loss_coef: float, optimizer: str | None, optimizer_metric: str, include_towers: bool,
                 allow_unmapped: bool, quiet: bool, **options) -> None:
    """Allocate experts, ranks and top-k per layer (SOURCE: a model folder or a scan table)."""
    from layerscope.planning import STRATEGIES as STRATEGY_FUNCTIONS
    from layerscope.planning import LoraSettings
    from layerscope.planning import plan as make_plan
    from layerscope.planning.explain import explain_text

    accepted = set(inspect.signature(STRATEGY_FUNCTIONS[strategy]).parameters)
    strategy_params = {}
    for option, value in options.items():  # the remaining options are named as the strategies' keywords
        if value is None:
            continue
        if option not in accepted:
            raise LayerscopeError(f"--{option.replace('_', '-')} does not apply to --strategy {strategy}")
        strategy_params[option] = str(value) if isinstance(value, Path) else value
    if out is not None and out.suffix != ".json":
        raise LayerscopeError(f"--out {out}: a plan is a .json file")
    if out is not None:
        check_writable([out])
    lora = LoraSettings(alpha_scale=alpha_scale, fixed_alpha=lora_alpha, dropout=dropout, init=init,
                        router_aux_loss_coef=aux_loss_coef)
    roles = [r.strip() for r in target_roles.split(",") if r.strip()] if target_roles else None
    the_plan = make_plan(source, strategy, budget_params=budget_params, budget_ratio=budget_ratio,
                         target_roles=roles, expert_type=expert_type, lora=lora, reference_rank=reference_rank,
                         reference_experts=reference_experts, command=_command_line(ctx), progress=not quiet,
                         optimizer=[m.strip() for m in optimizer.split(",") if m.strip()] if optimizer else None,
                         optimizer_metric=optimizer_metric, include_towers=include_towers,
                         allow_unmapped=allow_unmapped, **strategy_params)
    if out is not None:
        the_plan.save(out)
    if not quiet:
        click.echo(explain_text(the_plan))
        if out is not None:
            click.echo(f"wrote {out}")


def _command_line(ctx: click.Context) -> str:
    """The command as typed, minus the program path, for the plan's provenance."""
    return " ".join(["layerscope", *sys.argv[1:]]) if ctx.find_root().info_name else "layerscope"


@cli.command("export")
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write here instead of stdout.")
@click.option("--round-ranks", type=click.Choice(RANK_ROUNDINGS), help="Round every rank up to what a serving "
              "engine takes (vllm: 8, 16, 32, 64, 128, 256, 320, 512); the parameter change goes to stderr.")
@click.option("--check-model", type=click.Path(path_type=Path), help="peft/axolotl: check every pattern key and "
              "target names exactly one module of this checkpoint (default: the plan's model, when present).")
@click.option("--allow-other-model", is_flag=True, help="Accept a --check-model that is not the plan's model "
              "(other shapes, layer count or tensors).")
def export_command(plan_file: Path, fmt: str, out: Path | None, round_ranks: str | None,
                   check_model: Path | None, allow_other_model: bool) -> None:
    """Export a plan for a trainer: PEFT LoraConfig JSON, axolotl YAML, MoE-PEFT MixLoRA JSON, MoLA
    arguments, or a CSV table."""
    from layerscope.export import export_plan
    from layerscope.export.trainers import export_modules, rounding_report
    from layerscope.planning import Plan

    plan = Plan.load(plan_file)
    if check_model is None and fmt in ("peft", "axolotl") and Path(plan.model["path"]).exists():
        check_model = Path(plan.model["path"])
    if out is not None:
        check_writable([out])
    text = export_plan(plan, fmt, out, round_ranks=round_ranks, check_model=check_model,
                       allow_other_model=allow_other_model)
    if round_ranks is not None:
        click.echo(rounding_report(plan, export_modules(plan, round_ranks), round_ranks), err=True)
    click.echo(f"wrote {out}" if out is not None else text, nl=out is not None)


@cli.command("explain")
@click.argument("plan_file", type=click.Path(path_type=Path))
def explain_command(plan_file: Path) -> None:
    """Per-layer table of a plan: metric, experts, rank, top-k and parameters."""
    from layerscope.planning import Plan
    from layerscope.planning.explain import explain_text

    click.echo(explain_text(Plan.load(plan_file)))


@cli.command("activations")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), help="Text (.txt) or JSONL (.jsonl, field 'text'); "
              "default: the calibration text bundled with layerscope.")
@click.option("--max-samples", type=int, default=128, show_default=True, help="Sequences to run.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Document shuffling seed.")
@click.option("--eps", type=float, default=DEFAULT_EPS, show_default=True, help="Absolute near-zero threshold.")
@click.option("--rel-eps", type=float, default=DEFAULT_REL_EPS, show_default=True,
              help="Near-zero threshold relative to each token's output RMS.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the table (.parquet, .csv or .json).")
@click.option("--quiet", "-q", is_flag=True)
def activations_command(model: Path, calib: Path | None, max_samples: int, seq_len: int, batch_size: int, seed: int,
                        eps: float, rel_eps: float, device: str, dtype: str, out: Path | None, quiet: bool) -> None:
    """Near-zero fractions of every layer's and projection's outputs on calibration text."""
    from layerscope.activations import layer_fractions, measure
    from layerscope.tables import output_format, write_activations

    if out is not None:
        output_format(out)
        check_writable([out])
    table = measure(model, calib, max_samples=max_samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                    eps=eps, rel_eps=rel_eps, device=device, dtype=dtype, progress=not quiet)
    if out is not None:
        write_activations(table, out)
    if not quiet:
        attrs = table.attrs
        click.echo(f"{model}: {attrs['samples']} sequences x {attrs['seq_len']} tokens from {attrs['calibration']}; "
                   f"near-zero = |x| <= {rel_eps} x token RMS (abs: |x| <= {eps})")
        click.echo(layer_fractions(table).to_string(index=False, float_format="%.4f"))
        if out is not None:
            click.echo(f"wrote {out}")


@cli.command("plot")
@click.argument("scan_file", type=click.Path(path_type=Path))
@click.option("--layer", type=int, multiple=True, help="Plot the ESD of every matrix of this layer (repeatable).")
@click.option("--matrix", metavar="REGEX", help="Plot the ESD of every matrix whose name matches.")
@click.option("--model", type=click.Path(path_type=Path), help="Checkpoint to read the matrices from "
              "(default: the path recorded in the scan).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
def plot_command(scan_file: Path, layer: tuple[int, ...], matrix: str | None, model: Path | None, out: Path) -> None:
    """ESD plots for chosen matrices, plus the by-layer metric plots of a scan table."""
    from layerscope.tables import read_scan
    from layerscope.viz import plots
    from layerscope.viz.report import esd_eigenvalues

    table = read_scan(scan_file)
    figures = {out / "alphas_by_layer.png": plots.plot_alphas_by_layer(table),
               out / "norms_by_layer.png": plots.plot_norms_by_layer(table)}
    chosen = table[table["status"] == "ok"]
    if layer or matrix:
        mask = chosen["layer"].isin(layer) if layer else False
        if matrix:
            try:
                mask = mask | chosen["name"].str.contains(matrix, regex=True)
            except re.error as exc:
                raise LayerscopeError(f"--matrix {matrix!r}: invalid regular expression ({exc})") from None
        chosen = chosen[mask.fillna(False) if hasattr(mask, "fillna") else mask]
        if chosen.empty:
            raise LayerscopeError(f"{scan_file}: no analysable matrix matches --layer {list(layer)} / --matrix {matrix}")
        source = model or table.attrs.get("path")
        if not source or not Path(str(source)).exists():
            raise LayerscopeError(f"{scan_file}: the scanned model {source!r} is not here; pass --model PATH")
        for name, eigs in esd_eigenvalues(source, list(chosen["name"])).items():
            figures[out / f"esd_{plots.safe_stem(name)}.png"] = plots.plot_esd(eigs, name)
    out.mkdir(parents=True, exist_ok=True)  # nothing is written before every figure is drawn
    written = write_files({path: (lambda tmp, fig=fig: plots.save_to(fig, tmp)) for path, fig in figures.items()})
    for path in written:
        click.echo(f"wrote {path}")


@cli.command("report")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report folder (index.html inside).")
@click.option("--scan", "scan_file", type=click.Path(path_type=Path), help="Use this scan table instead of scanning.")
@click.option("--activations", "activations_file", type=click.Path(path_type=Path),
              help="An activations table (.parquet/.json) to include.")
@click.option("--plan", "plan_files", type=click.Path(path_type=Path), multiple=True, help="Plans to include.")
@click.option("--compare", "compare_file", type=click.Path(path_type=Path),
              help="A table from `layerscope compare` to show (alpha before/after by layer).")
@click.option("--allow-other-model", is_flag=True, help="Include plans/activations made for another model.")
@click.option("--quiet", "-q", is_flag=True)
def report_command(model: Path, out: Path, scan_file: Path | None, activations_file: Path | None,
                   plan_files: tuple[Path, ...], compare_file: Path | None, allow_other_model: bool,
                   quiet: bool) -> None:
    """Scan (or read a scan), then write an HTML report with plots, warnings, plans and tables."""
    from layerscope.planning import Plan
    from layerscope.planning.matching import activations_difference, plan_difference, require_same_model, table_shapes
    from layerscope.spectral.compare import COMPARE_SCHEMA
    from layerscope.spectral.scan import scan
    from layerscope.tables import read_activations, read_scan
    from layerscope.viz import build_report

    table = read_scan(scan_file) if scan_file else scan(model, progress=not quiet)
    activations = read_activations(activations_file) if activations_file else None
    plans = {path.stem: Plan.load(path) for path in plan_files}
    shapes, fingerprint = table_shapes(table), table.attrs.get("fingerprint")
    for path, the_plan in zip(plan_files, plans.values()):
        require_same_model(plan_difference(the_plan, shapes, table.attrs.get("num_layers"), fingerprint, str(model)),
                           str(path), allow_other_model)
    if activations is not None:
        require_same_model(activations_difference(activations, fingerprint, str(model), set(shapes)),
                           str(activations_file), allow_other_model)
    comparison = read_scan(compare_file, schema=COMPARE_SCHEMA) if compare_file else None
    index = build_report(table, out, model_path=model, activations=activations, plans=plans, comparison=comparison)
    click.echo(f"wrote {index}")


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_DEMO_OUT, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def demo_command(out: Path, quiet: bool) -> None:
    """The bundled MiniLM model end to end: scan, plans (alphalora, hilo, mola, adaptive-lora), exports."""
    from layerscope.demo import run_demo

    started = time.perf_counter()
    written, summary = run_demo(out, progress=not quiet)
    if not quiet:
        click.echo(summary)
        click.echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s; wrote:")
        for path in written:
            click.echo(f"  {path}")


@cli.command("compare")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("other", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Write the tables here (.parquet, .csv or .json).")
@click.option("--plot", type=click.Path(path_type=Path), help="Also draw α before/after by layer (.png).")
@click.option("--estimators", default=",".join(SPECTRAL_ESTIMATORS), show_default=True, callback=_split_estimators)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option("--include", metavar="REGEX")
@click.option("--exclude", metavar="REGEX")
@click.option("--cache", type=click.Path(path_type=Path), help="Resumable scans of both checkpoints (see scan).")
@click.option("--quiet", "-q", is_flag=True)
def compare_command(base: Path, other: Path, out: Path | None, plot: Path | None, estimators: tuple[str, ...],
                    device: str, precision: str, include: str | None, exclude: str | None, cache: Path | None,
                    quiet: bool) -> None:
    """Per matrix: BASE and OTHER metrics, their change, and the spectrum of OTHER − BASE."""
    from layerscope.spectral.compare import COMPARE_SCHEMA, compare, compare_layers
    from layerscope.tables import scan_outputs, write_scan

    if out is not None:
        check_writable(scan_outputs(out))
    if plot is not None:
        check_writable([plot], "--plot")
    table = compare(base, other, estimators=estimators, device=device, precision=precision, include=include,
                    exclude=exclude, cache=cache, progress=not quiet)
    layers = compare_layers(table)
    written = write_scan(table, layers, out, schema=COMPARE_SCHEMA) if out is not None else []
    if plot is not None:
        from layerscope.viz import plots

        figure = plots.plot_compare(layers)
        written += write_files({plot: lambda tmp: plots.save_to(figure, tmp)}, "--plot")
    if not quiet:
        changed = int((table["diff_status"] != "zero_matrix").sum())
        click.echo(f"{base} -> {other}: {changed} of {len(table)} matrices changed")
        shown = [c for c in ("changed_matrices", "alpha_base", "alpha_other", "delta_alpha", "delta_alpha_hill")
                 if c in layers.columns]
        click.echo(layers[["layer", *shown]].to_string(index=False, float_format="%.3f"))
        for path in written:
            click.echo(f"wrote {path}")


@cli.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the merged model.")
@click.option("--quiet", "-q", is_flag=True)
def merge_command(base: Path, adapter: Path, out: Path, quiet: bool) -> None:
    """Write BASE with a one-expert ADAPTER merged in (W + s·B·A), in BASE's shard layout."""
    from layerscope.adapters import merge

    if out.exists() and not out.is_dir():
        raise LayerscopeError(f"--out {out}: is a file, not a folder")
    written = merge(base, adapter, out, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {len(written)} files to {out}")


@cli.command("architectures")
def architectures_command() -> None:
    """Print the table of supported architectures (Markdown, as in the README)."""
    from layerscope.checkpoint.support import architecture_table

    click.echo(architecture_table(), nl=False)


def one_line(text: str) -> str:
    """``text`` with line breaks, control characters and lone surrogates escaped: one terminal line."""
    return "".join(
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) in UNPRINTABLE else char
        for char in text)


UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _gathered_elsewhere(message: str) -> bool:
    """Under torchrun, a failure every rank learned through the collective is printed by rank 0 only."""
    rank = os.environ.get("RANK", "0")
    return rank != "0" and message.startswith("rank ")


def _error(message: str) -> None:
    click.echo(f"error: {one_line(message)}", err=True)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except LayerscopeError as exc:
        if not _gathered_elsewhere(str(exc)):
            _error(str(exc))
        sys.exit(2)
    except OSError as exc:  # unreadable input, unwritable --out: the message names the file
        _error(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `layerscope`: the overview, as --help shows it
        click.echo(exc.ctx.get_help())
        sys.exit(0)
    except click.UsageError as exc:  # one line, like every other input error
        _error(exc.format_message())
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
