"""Commands that read checkpoints: scan, compare, plot, report, demo, merge, architectures."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from layerscope.cli.group import DEFAULT_DEMO_OUT, _int_list, _split_estimators, cli, one_line
from layerscope.errors import LayerscopeError
from layerscope.names import (
    ALL_ESTIMATORS,
    PRECISIONS,
    SPECTRAL_ESTIMATORS,
)
from layerscope.outputs import check_writable, write_files


@cli.command("scan")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Write the tables here (.parquet, .csv or .json).")
@click.option("--estimators", default=",".join(SPECTRAL_ESTIMATORS), show_default=True, callback=_split_estimators,
              help=f"Comma-separated estimators, of: {', '.join(ALL_ESTIMATORS)} (docs/commands/scan.md).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Eigenvalue precision policy (docs/commands/scan.md).")
@click.option("--fix-fingers", type=click.Choice(["clip_xmax"]), help="WeightWatcher's finger fix: alpha is the fit "
              "with the largest eigenvalues clipped (raw_alpha, num_fingers columns).")
@click.option("--max-fingers", type=int, default=10, show_default=True, help="--fix-fingers: most eigenvalues clipped.")
@click.option("--finger-thresh", type=float, default=1.0, show_default=True,
              help="--fix-fingers: how far alpha must drop below the raw fit.")
@click.option("--xmax", type=int, help="WeightWatcher's integer xmax: the alpha fit leaves out this many of the "
              "largest eigenvalues.")
@click.option("--xmin-max", type=float, help="WeightWatcher's xmin_max: the top of alpha_peak's xmin window (raw "
              "eigenvalue units; default 1.5 x the ESD's peak).")
@click.option("--tolerance", type=float, default=1e-6, show_default=True,
              help="--estimators rank: weak_rank_loss counts the eigenvalues below it (WeightWatcher's default).")
@click.option("--include", metavar="REGEX", help="Only tensors whose name matches.")
@click.option("--exclude", metavar="REGEX", help="Skip tensors whose name matches.")
@click.option("--kinds", help="Only these kinds, comma-separated (projection, expert, embedding, lm_head, router …).")
@click.option("--roles", help="Only these roles, comma-separated (q, k, v, o, gate, up, down …).")
@click.option("--layers", callback=_int_list, help="Only these blocks, comma-separated (the layer column).")
@click.option("--min-evals", type=int, help="Leave out matrices with fewer eigenvalues (WeightWatcher's min_evals).")
@click.option("--max-evals", type=int, help="Leave out matrices with more eigenvalues (WeightWatcher's max_evals).")
@click.option("--max-n", type=int, help="Leave out matrices whose larger side exceeds this (WeightWatcher's max_N, "
              "50,000 there by default: it drops a 128k-vocabulary embedding; layerscope keeps every matrix).")
@click.option("--pool/--no-pool", default=True, show_default=True, help="Convolution kernels: one row with the "
              "kernel positions' eigenvalues pooled (WeightWatcher's pool), or one row per position.")
@click.option("--conv2d-norm/--no-conv2d-norm", default=True, show_default=True, help="WeightWatcher's conv2d_norm: "
              "a Conv2d's eigenvalues times 1/2 pooled, rf/2 per position.")
@click.option("--describe", is_flag=True, help="List the matrices a scan would analyse (name, kind, layer, role, "
              "shape); compute nothing.")
@click.option("--split-fused", is_flag=True, help="Also report the parts of fused qkv / gate_up matrices.")
@click.option("--architecture", help="Force a naming scheme (llama, gpt2, bert, ..., generic).")
@click.option("--revision", help="Hub cache folders (models--org--name): snapshot commit or ref (default: main).")
@click.option("--cache", type=click.Path(path_type=Path), help="Keep each finished tensor's results in this "
              "folder: a killed scan resumes where it stopped, a repeated one is instant.")
@click.option("--base", type=click.Path(path_type=Path), help="Adapter folders: also analyse W + ΔW of this "
              "base model.")
@click.option("--threads", type=int, help="CPU threads (default: $LAYERSCOPE_THREADS, else this process's share "
              "of its CPUs: all of them, or cores / ranks on this node under torchrun).")
@click.option("--quiet", "-q", count=True, help="No progress bar, no summary; warnings about the data (missing "
              "weights, non-finite values, weights not analysed) stay on stderr.  Twice (-qq): those too are silenced.")
def scan_command(path: Path, out: Path | None, estimators: tuple[str, ...], device: str, precision: str,
                 fix_fingers: str | None, max_fingers: int, finger_thresh: float, xmax: int | None,
                 xmin_max: float | None, tolerance: float, include: str | None, exclude: str | None,
                 kinds: str | None, roles: str | None,
                 layers: tuple[int, ...] | None, min_evals: int | None, max_evals: int | None, max_n: int | None,
                 pool: bool, conv2d_norm: bool, describe: bool, split_fused: bool, architecture: str | None,
                 revision: str | None, cache: Path | None, base: Path | None, threads: int | None,
                 quiet: int) -> None:
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
                          revision=revision, cache=cache, base=base, progress=not quiet, threads=threads,
                          tolerance=tolerance, kinds=_names(kinds), roles=_names(roles), layers=tuple(layers or ()),
                          min_evals=min_evals, max_evals=max_evals, max_n=max_n, describe=describe,
                          fix_fingers=fix_fingers, max_fingers=max_fingers, finger_thresh=finger_thresh, xmax=xmax,
                          xmin_max=xmin_max, pool=pool, conv2d_norm=conv2d_norm)
    matrices = scan(path, **options.__dict__)
    if describe:
        if writer:
            click.echo(matrices.drop(columns=["tensor"]).to_string(index=False))
            click.echo(f"{len(matrices)} matrices (nothing computed: --describe)")
        return
    if not writer:
        return  # rank 0 writes and reports the gathered table
    layers = layer_summary(matrices)
    written = write_scan(matrices, layers, out) if out is not None else []
    if not quiet:
        _print_summary(matrices, layers, time.perf_counter() - started, written)
    elif quiet == 1:
        for line in data_warnings(matrices):
            click.echo(line, err=True)


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip()) if text else ()


def data_warnings(matrices) -> list[str]:
    """What a reader must not miss about the data, even under --quiet: a layout guessed by the generic rule,
    weights absent or not analysed, non-finite values, block Linears of no known role."""
    from layerscope.spectral.coverage import not_analysed_line

    attrs, lines = matrices.attrs, []
    if attrs["naming"] == "generic":
        lines.append(f"WARNING: {attrs.get('model_type') or 'this architecture'} is not in layerscope's naming table: "
                     "layers were found with the generic '.N.' rule and every block matrix is treated as a "
                     "projection; check the table (or pass --architecture) before planning")
    skipped = not_analysed_line(attrs)
    if skipped:
        lines.append(f"note: {skipped} (listed in the table's model facts, not_analysed)")
    nonfinite = matrices.loc[matrices["status"] == "nonfinite_weights", "name"].tolist()
    if nonfinite:
        lines.append(f"WARNING: {len(nonfinite)} matri{'ces' if len(nonfinite) > 1 else 'x'} with NaN or infinite "
                     f"values, not analysed: {', '.join(nonfinite[:3])}{' ...' if len(nonfinite) > 3 else ''}")
    missing = attrs.get("missing") or []
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        lines.append(f"WARNING: {len(missing)} weight matri{'ces' if len(missing) > 1 else 'x'} that the architecture "
                     f"expects {'are' if len(missing) > 1 else 'is'} absent (transformers would initialise "
                     f"{'them' if len(missing) > 1 else 'it'} at random; listed in the model facts, missing): {shown}")
    unmapped = attrs.get("unmapped") or []
    if unmapped:
        shown = ", ".join(one_line(m) for m in unmapped[:5]) + (" ..." if len(unmapped) > 5 else "")
        lines.append(f"WARNING: {len(unmapped)} Linear layers inside the blocks have no known role (kind 'other', "
                     f"left out of the layer means; plan refuses them without --allow-unmapped): {shown}")
    return lines


def _warning_counts(matrices) -> str:
    """``; 2 over-trained, 1 under-trained`` (WeightWatcher's per-row verdicts), or nothing."""
    if "warning" not in matrices.columns:
        return ""
    counts = matrices["warning"].value_counts()
    shown = [f"{int(counts[verdict])} {verdict}" for verdict in ("over-trained", "under-trained") if verdict in counts]
    return f"; {', '.join(shown)} (warning column)" if shown else ""


def _print_summary(matrices, layers, seconds: float, written: list[Path]) -> None:
    from layerscope.spectral.columns import not_analysed
    from layerscope.spectral.coverage import depth_description

    attrs = matrices.attrs
    click.echo(
        f"{attrs['path']}: {attrs.get('architecture') or attrs.get('model_type') or 'unknown architecture'}, "
        f"naming={attrs['naming']}, {depth_description(attrs)}, {len(matrices)} matrices "
        f"({not_analysed(matrices)}) in {seconds:.1f} s on {attrs['device']}"
    )
    for line in data_warnings(matrices):
        click.echo(line, err=True)
    from layerscope.spectral.rank import summary

    means = summary(matrices)
    if means:
        click.echo("model means: " + ", ".join(f"{name} {value:.3f}" for name, value in means.items())
                   + _warning_counts(matrices))
    if attrs.get("towers"):
        click.echo(f"towers (own stacks, not planned unless --include-towers): {', '.join(attrs['towers'])}")
    for rank in attrs.get("ranks") or []:  # torchrun: is any rank's share much heavier than the others?
        click.echo(f"rank {rank['rank']}: {rank['matrices']} matrices, {rank['seconds']:.1f} s, "
                   f"peak memory {rank['peak_mib']:.0f} MiB, {rank['threads']} threads")
    if attrs.get("cache"):
        cache = attrs["cache"]
        click.echo(f"cache {cache['folder']}: {cache['reused']} tensors reused, {cache['computed']} computed")
    if attrs.get("quantization"):
        click.echo(f"dequantized from: {', '.join(attrs['quantization'])} (see the quantization column)")
    cols = [c for c in ("alpha", "alpha_hill", "alpha_peak") if c in layers.columns]
    if len(layers):
        several_stacks = "stack" in layers.columns and layers["stack"].nunique() > 1
        where = (["stack", "stack_layer"] if several_stacks else []) + (
            ["mixer"] if "mixer" in layers.columns and layers["mixer"].nunique() > 1 else [])
        click.echo(layers[["layer", *where, "num_matrices", *cols]].fillna({"mixer": "-"}).to_string(index=False, float_format="%.3f"))
    for path in written:
        click.echo(f"wrote {path}")


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
        from layerscope.viz.report import model_display_name

        figure = plots.plot_compare(layers, (model_display_name(base), model_display_name(other)))
        written += write_files({plot: lambda tmp: plots.save_to(figure, tmp)}, "--plot")
    if not quiet:
        changed = int((table["diff_status"] != "zero_matrix").sum())
        click.echo(f"{base} -> {other}: {changed} of {len(table)} matrices changed")
        shown = [c for c in ("changed_matrices", "alpha_base", "alpha_other", "delta_alpha", "delta_alpha_hill",
                             "relative_error") if c in layers.columns]
        click.echo(layers[["layer", *shown]].to_string(index=False, float_format="%.3f"))
        click.echo(summary_change_line(table.attrs.get("summary") or {}))
        for path in written:
            click.echo(f"wrote {path}")


def summary_change_line(change: dict) -> str:
    """``model means: alpha 3.912 -> 3.870 (-0.042), ...``: WeightWatcher's get_summary() of both models."""
    def shown(value, sign: str = "") -> str:
        return "n/a" if value is None else format(value, f"{sign}.3f")

    parts = [f"{metric} {shown(v['base'])} -> {shown(v['other'])} ({shown(v['change'], '+')})"
             for metric, v in change.items()]
    return "model means (WeightWatcher's get_summary): " + (", ".join(parts) if parts else "none")


@cli.command("plot")
@click.argument("scan_file", type=click.Path(path_type=Path))
@click.option("--layer", type=int, multiple=True, help="Plot the ESD of every matrix of this layer (repeatable).")
@click.option("--matrix", metavar="REGEX", help="Plot the ESD of every matrix whose name matches.")
@click.option("--model", type=click.Path(path_type=Path), help="Checkpoint to read the matrices from "
              "(default: the path recorded in the scan).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
def plot_command(scan_file: Path, layer: tuple[int, ...], matrix: str | None, model: Path | None, out: Path) -> None:
    """ESD plots for chosen matrices, plus the by-layer metric plots of a scan table; for a training-spectra
    table (layerscope.adapters.watch), α over steps per layer."""
    from layerscope.tables import read_scan
    from layerscope.viz import plots
    from layerscope.viz.report import esd_eigenvalues

    table = read_scan(scan_file)
    if "step" in table.columns:  # written during training: one row per (step, matrix)
        if layer or matrix or model:
            raise LayerscopeError(f"{scan_file}: a training-spectra table; --layer/--matrix/--model apply to scans")
        figure = plots.plot_alpha_over_steps(table)
        out.mkdir(parents=True, exist_ok=True)
        for path in write_files({out / "alpha_over_steps.png": lambda tmp: plots.save_to(figure, tmp)}):
            click.echo(f"wrote {path}")
        return
    figures = {out / "alphas_by_layer.png": plots.plot_alphas_by_layer(table),
               out / "norms_by_layer.png": plots.plot_norms_by_layer(table)}
    from layerscope.viz.experts import has_experts, plot_expert_heatmap

    if has_experts(table):
        figures[out / "experts_alpha.png"] = plot_expert_heatmap(table)
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
            asked = " / ".join(part for part in (f"--layer {', '.join(map(str, layer))}" if layer else "",
                                                 f"--matrix {matrix}" if matrix else "") if part)
            raise LayerscopeError(f"{scan_file}: no analysable matrix matches {asked}")
        source = model or table.attrs.get("path")
        if not source or not Path(str(source)).exists():
            raise LayerscopeError(f"{scan_file}: the scanned model {source!r} is not here; pass --model PATH")
        from layerscope.planning.matching import require_same_model, scan_difference

        require_same_model(scan_difference(table, source), str(scan_file), False)
        for name, eigs in esd_eigenvalues(source, list(chosen["name"])):
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
@click.option("--plan-comparison", "plan_comparison_file", type=click.Path(path_type=Path),
              help="A comparison.json from `layerscope compare-plans` to show.")
@click.option("--allow-other-model", is_flag=True, help="Include plans/activations made for another model.")
@click.option("--quiet", "-q", is_flag=True)
def report_command(model: Path, out: Path, scan_file: Path | None, activations_file: Path | None,
                   plan_files: tuple[Path, ...], compare_file: Path | None, plan_comparison_file: Path | None,
                   allow_other_model: bool, quiet: bool) -> None:
    """Scan (or read a scan), then write an HTML report with plots, warnings, plans and tables."""
    from layerscope.planning import Plan
    from layerscope.planning.matching import ALLOW_FLAG as ALLOW
    from layerscope.planning.matching import activations_difference, plan_difference, require_same_model, table_shapes
    from layerscope.spectral.compare import COMPARE_SCHEMA
    from layerscope.spectral.scan import scan
    from layerscope.tables import read_activations, read_scan
    from layerscope.viz import build_report

    table = read_scan(scan_file) if scan_file else scan(model, progress=not quiet)
    if scan_file:
        from layerscope.planning.matching import scan_difference

        require_same_model(scan_difference(table, model), str(scan_file), allow_other_model)
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
    plan_comparison = None
    if plan_comparison_file is not None:
        from layerscope.strictjson import strict_json

        if not plan_comparison_file.is_file():
            raise LayerscopeError(f"{plan_comparison_file}: no such file")
        plan_comparison = strict_json(plan_comparison_file.read_bytes(), str(plan_comparison_file))
        compared_on = plan_comparison.get("fingerprint") if isinstance(plan_comparison, dict) else None
        if compared_on != fingerprint and not allow_other_model:
            raise LayerscopeError(f"{plan_comparison_file} was made for another model: its model's header fingerprint "
                                  f"{str(compared_on)[:16]} differs from {model}'s ({ALLOW} to use it anyway)")
    index = build_report(table, out, model_path=model, activations=activations, plans=plans, comparison=comparison,
                         plan_comparison=plan_comparison, progress=not quiet)
    click.echo(f"wrote {index}")


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_DEMO_OUT, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def demo_command(out: Path, quiet: bool) -> None:
    """The bundled MiniLM model end to end: scan, plans (alphalora, hilo, mola, adaptive-lora), exports."""
    from layerscope.demo import run_demo, written_lines

    started = time.perf_counter()
    written, summary = run_demo(out, progress=not quiet)
    if not quiet:
        click.echo(summary)
        click.echo(f"\ndemo finished in {time.perf_counter() - started:.1f} s; wrote {len(written)} files "
                   f"(open {out / 'index.html'}):")
        for line in written_lines(out, written):
            click.echo(line)


@cli.command("architectures")
def architectures_command() -> None:
    """Print the table of supported architectures (Markdown, as in the README)."""
    from layerscope.checkpoint.support import architecture_table

    click.echo(architecture_table(), nl=False)


@cli.command("convert-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.argument("folder", type=click.Path(path_type=Path))
def convert_gguf_command(gguf_file: Path, folder: Path) -> None:
    """Write a GGUF file (llama.cpp) as a Hugging Face folder: dequantized model.safetensors, config.json and the
    tokenizer (needs the gguf and transformers packages).  Every command, the runtime and trainers can then use it."""
    from layerscope.checkpoint.gguf import materialize_gguf

    click.echo(f"wrote {materialize_gguf(gguf_file, folder)}")


@cli.command("requantize")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--type", "ggml_type", required=True, help="ggml type to re-quantize every 2-D weight to: Q8_0, Q4_0, "
              "Q4_1, Q5_0, Q5_1, …")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The new .gguf file.")
@click.option("--quiet", "-q", is_flag=True)
def requantize_command(gguf_file: Path, ggml_type: str, out: Path, quiet: bool) -> None:
    """Write GGUF_FILE again at another quantization (gguf.quants), e.g. to see with `layerscope compare` which
    layers a quantization hurts when no original weights exist."""
    from layerscope.checkpoint.ggufread import requantize_gguf

    if not gguf_file.is_file() or gguf_file.suffix != ".gguf":
        raise LayerscopeError(f"{gguf_file}: not a .gguf file")
    check_writable([out])
    counts = requantize_gguf(gguf_file, out, ggml_type, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {out}: {counts['requantized']} tensors re-quantized to {ggml_type.upper()}, "
                   f"{counts['kept']} kept as stored")
