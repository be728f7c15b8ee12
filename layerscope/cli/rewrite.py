"""Commands that write a checkpoint in its source's layout: ``merge`` (an adapter into its base) and ``smooth``
(WeightWatcher's SVD smoothing)."""

from __future__ import annotations

from pathlib import Path

import click

from layerscope.cli.group import _int_list, cli
from layerscope.errors import LayerscopeError


def _out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LayerscopeError(f"--out {out}: is a file, not a folder")


@cli.command("merge")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the merged model.")
@click.option("--quiet", "-q", is_flag=True)
def merge_command(base: Path, adapter: Path, out: Path, quiet: bool) -> None:
    """Write BASE with a one-expert ADAPTER merged in (W + s·B·A), in BASE's shard layout."""
    from layerscope.adapters import merge

    _out_folder(out)
    written = merge(base, adapter, out, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {len(written)} files to {out}")


@cli.command("smooth")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["svd", "detX", "alpha_min"]), default="detX", show_default=True,
              help="How many singular triplets each matrix keeps: svd (--percent of its eigenvalues), detX (the detX "
                   "constraint's count), alpha_min (the power-law tail's).")
@click.option("--percent", type=float, default=0.8, show_default=True,
              help="--method svd: the share of eigenvalues kept (negative: the share of the largest removed).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the smoothed model.")
@click.option("--include", metavar="REGEX", help="Only tensors whose name matches.")
@click.option("--exclude", metavar="REGEX", help="Leave out tensors whose name matches.")
@click.option("--kinds", help="Only these kinds, comma-separated (projection, expert, embedding, conv …).")
@click.option("--layers", callback=_int_list, help="Only these blocks, comma-separated.")
@click.option("--device", default="auto", show_default=True, help="Where the spectra are computed: auto, cpu, cuda.")
@click.option("--quiet", "-q", is_flag=True)
def smooth_command(model: Path, method: str, percent: float, out: Path, include: str | None, exclude: str | None,
                   kinds: str | None, layers: tuple[int, ...] | None, device: str, quiet: bool) -> None:
    """Write MODEL with its matrices replaced by their best low-rank approximations (WeightWatcher's
    SVDSmoothing): the same shards, names, dtypes and config; only the smoothed matrices change."""
    from layerscope.adapters.smooth import REPORT, smooth

    _out_folder(out)
    report = smooth(model, out, method, percent, include=include, exclude=exclude,
                    kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else (),
                    layers=tuple(layers or ()), device=device, progress=not quiet)
    if not quiet:
        change = report["relative_change"].median() if len(report) else 0.0
        click.echo(f"smoothed {len(report)} matrices ({method}{f' {percent:g}' if method == 'svd' else ''}; median "
                   f"relative change {change:.3f}); wrote {out} (per matrix: {out / REPORT})")
