"""Matplotlib figures (Agg backend, no display): per-matrix ESDs and model-level panels.

Every function returns the Figure; :func:`save` writes it with a deterministic name.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from layerscope.errors import LayerscopeError  # noqa: E402
from layerscope.spectral.estimators import alpha_hill, alpha_ww, as_eigenvalues, ks_scan  # noqa: E402

ALPHA_COLUMNS = {"alpha": "alpha (WeightWatcher)", "alpha_hill": "alpha_hill (TempBalance)",
                 "alpha_peak": "alpha_peak (AlphaLoRA)"}
REFERENCE_ALPHAS = (2.0, 6.0)  # HT-SR: below 2 over-trained / very heavy tails, above 6 under-trained
DPI = 110


def save(fig: Figure, folder: Path, stem: str, fmt: str = "png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.{fmt}"
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None} if fmt == "png" else
                {"Creator": None, "Date": None})
    plt.close(fig)
    return path


def save_to(fig: Figure, path: Path, fmt: str = "png") -> Path:
    """Draw ``fig`` into exactly ``path`` (for output sets, whose temporary names have no suffix)."""
    fig.savefig(path, format=fmt, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def safe_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def powerlaw_pdf_line(alpha: float, xmin: float, xmax: float, tail_share: float, points: int = 50):
    """(x, density) of the fitted power law from xmin, scaled to the share of eigenvalues in the tail."""
    x = np.logspace(math.log10(xmin), math.log10(xmax), points)
    return x, tail_share * (alpha - 1) / xmin * (x / xmin) ** (-alpha)


def plot_esd(eigs, name: str = "", model=None) -> Figure:
    """WeightWatcher-style diagnostics for one matrix, as a matplotlib Figure (shown inline in a notebook).

    ``eigs``: its eigenvalues (1-D), the matrix itself (2-D tensor or array), a scan table row, or the matrix's
    name with ``model`` (a checkpoint path, a model in memory or a state dict), e.g.
    ``plot_esd("encoder.layer.0.attention.self.query.weight", model=path)`` or ``plot_esd(table.iloc[3],
    model=path)``.  Panels: log-log ESD (log-spaced bins, density) with the fitted power law drawn from xmin
    and markers at xmin and the Hill xmin; lin-lin ESD; D vs xmin; alpha vs xmin.
    """
    from layerscope.spectral.single import esd

    if isinstance(eigs, pd.Series):  # a scan table row
        name = name or str(eigs["name"])
        eigs = esd(model, str(eigs["name"])) if model is not None else None
        if eigs is None:
            raise LayerscopeError(f"plot_esd: a table row needs model= (the checkpoint or model of {name})")
    elif isinstance(eigs, str):
        if model is None:
            raise LayerscopeError(f"plot_esd({eigs!r}): a matrix name needs model= (a checkpoint path or a model)")
        name, eigs = name or eigs, esd(model, eigs)
    elif getattr(eigs, "ndim", 1) == 2:
        eigs = esd(eigs)
    e = np.sort(as_eigenvalues(eigs))
    if e.ndim != 1 or not (e > 0).any():
        raise LayerscopeError(f"plot_esd{f' {name}' if name else ''}: no positive eigenvalue to draw")
    fit, hill = alpha_ww(e), alpha_hill(e)
    positive = e[e > 0]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    (loglog, linlin), (d_curve, a_curve) = axes

    bins = np.logspace(math.log10(positive.min()), math.log10(positive.max()), 60)
    loglog.hist(positive, bins=bins, density=True, color="#4C72B0", alpha=0.7, label="ESD")
    if math.isfinite(fit.alpha):
        share = float((positive >= fit.xmin).mean())
        x, y = powerlaw_pdf_line(fit.alpha, fit.xmin, float(positive.max()), share)
        loglog.plot(x, y, color="#C44E52", linestyle="--", linewidth=2,
                    label=f"power law α={fit.alpha:.2f}", gid="powerlaw-fit")
        loglog.axvline(fit.xmin, color="#C44E52", label=f"xmin={fit.xmin:.3g}", gid="xmin")
    if math.isfinite(hill.alpha):
        loglog.axvline(hill.xmin, color="#55A868", linestyle=":", label=f"Hill xmin={hill.xmin:.3g}", gid="xmin-hill")
    loglog.set_xscale("log")
    loglog.set_yscale("log")
    loglog.set_xlabel("eigenvalue λ")
    loglog.set_ylabel("density")
    loglog.set_title("log-log ESD")
    loglog.legend(fontsize=8)

    linlin.hist(positive, bins=100, density=True, color="#4C72B0", alpha=0.7)
    if math.isfinite(fit.alpha):
        linlin.axvline(fit.xmin, color="#C44E52", label="xmin")
        linlin.legend(fontsize=8)
    linlin.set_xlabel("eigenvalue λ")
    linlin.set_ylabel("density")
    linlin.set_title("lin-lin ESD")

    scan = ks_scan(e)
    d_curve.plot(scan.xmins, scan.Ds, color="#8172B2")
    a_curve.plot(scan.xmins, scan.alphas, color="#937860")
    for ax, label, title in ((d_curve, "KS distance D", "D vs xmin"), (a_curve, "α", "α vs xmin")):
        ax.set_xscale("log")
        ax.set_xlabel("xmin")
        ax.set_ylabel(label)
        ax.set_title(title)
        if math.isfinite(fit.alpha):
            ax.axvline(fit.xmin, color="#C44E52", linestyle="--")
    a_curve.set_ylim(0, min(20, float(np.nanmax(scan.alphas)) + 1) if len(scan.alphas) else 10)

    fig.suptitle(f"{name}\nα={fit.alpha:.3f}  α_hill={hill.alpha:.3f}  D={fit.D:.3f}  λ_max={float(e[-1]):.4g}",
                 fontsize=10)
    fig.tight_layout()
    return fig


# Points are coloured by what part of the block a matrix is (a handful of colours, not one per role).
PART_COLOURS = {"attention": "#4C72B0", "linear_attention": "#8172B3", "mamba": "#55A868", "conv": "#937860",
                "recurrent": "#DA8BC3", "mlp": "#DD8452", "expert": "#C44E52"}


def _part_of(row) -> str:
    if row["kind"] == "expert":
        return "expert"
    mixer = row.get("mixer") if hasattr(row, "get") else None
    return mixer if isinstance(mixer, str) and mixer else "mlp"


def stack_spans(rows: pd.DataFrame) -> list[tuple[str, int, int]]:
    """(stack, first layer, last layer) of each block stack, in layer order; [] for a model with one stack."""
    if "stack" not in rows.columns or rows["stack"].dropna().nunique() < 2:
        return []
    bounds = rows.dropna(subset=["stack"]).groupby("stack")["layer"].agg(["min", "max"]).sort_values("min")
    return [(str(stack), int(b["min"]), int(b["max"])) for stack, b in bounds.iterrows()]


def per_stack(rows: pd.DataFrame, spans: list[tuple[str, int, int]]) -> list[tuple[str, pd.DataFrame]]:
    """The rows split by stack (the whole table when there is one), so lines never run from one stack into
    the next (a language model's last layer into a vision tower's first)."""
    if not spans:
        return [("", rows)]
    return [(stack, rows[rows["stack"] == stack]) for stack, _, _ in spans]


def mark_stacks(ax, spans: list[tuple[str, int, int]]) -> None:
    """Alternate shading and a name over each stack's layers."""
    for i, (stack, first, last) in enumerate(spans):
        if i % 2:
            ax.axvspan(first - 0.5, last + 0.5, color="#000000", alpha=0.05, linewidth=0)
        if i:
            ax.axvline(first - 0.5, color="#666666", linewidth=0.8)
        ax.text((first + last) / 2, 0.98, stack.replace("_", " "), transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="#444444")


def plot_alphas_by_layer(table: pd.DataFrame) -> Figure:
    """The alphas by layer, one panel and scale per metric: every matrix a dot coloured by the part of the
    block it belongs to (attention, linear attention, mamba, conv, MLP, experts), the layer mean a line,
    α = 2 and 6 marked; on hybrid models each layer's background shows its token-mixer kind."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    targets = table[table["kind"].isin(["projection", "expert"]) & table["layer"].notna()].copy()
    columns = [c for c in ALPHA_COLUMNS if c in targets.columns and targets[c].notna().any()]
    targets["part"] = [_part_of(row) for _, row in targets.iterrows()]
    layer_mixer = targets.dropna(subset=["mixer"]).groupby("layer")["mixer"].agg(
        lambda v: "+".join(sorted(set(v)))) if "mixer" in targets.columns else pd.Series(dtype=str)
    hybrid = layer_mixer.nunique() > 1
    spans = stack_spans(targets)
    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(4.4 * max(1, len(columns)), 3.9), squeeze=False)
    for ax, column in zip(axes[0], columns):
        mark_stacks(ax, spans)
        if hybrid:
            for layer, mixer in layer_mixer.items():
                colour = PART_COLOURS.get(mixer.split("+")[0], "#999999")
                ax.axvspan(layer - 0.5, layer + 0.5, color=colour, alpha=0.10, linewidth=0)
        for part, colour in PART_COLOURS.items():
            group = targets[targets["part"] == part]
            if len(group):
                ax.scatter(group["layer"], group[column], s=12, alpha=0.6, color=colour, label=part.replace("_", " "))
        for i, (_, part) in enumerate(per_stack(targets, spans)):  # one line per stack: never joined across
            means = part.groupby("layer")[column].mean()
            ax.plot(means.index, means.values, color="black", linewidth=2, label="layer mean" if i == 0 else None)
        for ref in REFERENCE_ALPHAS:
            ax.axhline(ref, color="grey", linestyle="--", linewidth=1)
        values = targets[column].dropna()
        if len(values):  # own scale per metric; a few extreme fits must not flatten the rest
            low, high = float(values.quantile(0.01)), float(values.quantile(0.99))
            pad = 0.08 * max(high - low, 0.5)
            ax.set_ylim(min(low, 2) - pad, high + pad)
        ax.set_title(ALPHA_COLUMNS[column])
        ax.set_xlabel("layer")
        ax.set_ylabel(column)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if hybrid:
        handles += [Patch(color=PART_COLOURS.get(m, "#999999"), alpha=0.25) for m in sorted(set(layer_mixer))]
        labels += [f"{m.replace('_', ' ')} layer" for m in sorted(set(layer_mixer))]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if len(labels) <= 6 else 0.14, 1, 1))
    return fig


def plot_compare(layers: pd.DataFrame, names: tuple[str, str] = ("base", "other")) -> Figure:
    """α of BASE and OTHER by layer, one panel (and y scale: the alphas live on different ranges) per alpha
    column of a compare table; ``names`` label the two models in the legend."""
    from matplotlib.ticker import MaxNLocator

    if names[0] == names[1]:
        names = (f"{names[0]} (base)", f"{names[1]} (other)")
    columns = [c for c in ALPHA_COLUMNS if f"{c}_base" in layers.columns]
    error = "relative_error" in layers.columns and layers["relative_error"].notna().any()
    panels = len(columns) + int(error)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(4.4 * max(1, panels), 3.9), squeeze=False)
    if error:  # which layers OTHER moved most: a quantization's damage per layer
        ax = axes[0][-1]
        ax.bar(layers["layer"], layers["relative_error"], color="#C44E52")
        ax.set_title(f"‖{names[1]} − {names[0]}‖ / ‖{names[0]}‖" if len(names[0]) + len(names[1]) < 40
                     else "relative Frobenius error")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative_error (layer mean)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, column in zip(axes[0], columns):
        ax.plot(layers["layer"], layers[f"{column}_base"], marker="o", markersize=3, label=names[0])
        ax.plot(layers["layer"], layers[f"{column}_other"], marker="s", markersize=3, label=names[1])
        for ref in REFERENCE_ALPHAS:
            ax.axhline(ref, color="grey", linestyle="--", linewidth=1)
        ax.set_title(ALPHA_COLUMNS[column])
        ax.set_xlabel("layer")
        ax.set_ylabel(column)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_norms_by_layer(table: pd.DataFrame) -> Figure:
    """alpha_weighted, log_norm and stable_rank by layer: one line per role on a dense model; on a model with
    many roles (experts) one line per block part (its mean), so the legend stays short."""
    from matplotlib.ticker import MaxNLocator

    targets = table[table["kind"].isin(["projection", "expert"]) & table["layer"].notna()].copy()
    columns = [c for c in ("alpha_weighted", "log_norm", "stable_rank") if c in targets.columns
               and targets[c].notna().any()]
    by_part = targets["role"].nunique() > 8
    if by_part:
        targets["line"] = [_part_of(row).replace("_", " ") for _, row in targets.iterrows()]
    else:
        targets["line"] = targets["role"].astype(str)
    spans = stack_spans(targets)
    colours = {line: PART_COLOURS.get(line.replace(" ", "_")) if by_part else f"C{i % 10}"
               for i, line in enumerate(sorted(targets["line"].unique()))}
    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(4.4 * max(1, len(columns)), 3.9), squeeze=False)
    for ax, column in zip(axes[0], columns):
        mark_stacks(ax, spans)
        for i, (_, part) in enumerate(per_stack(targets, spans)):
            for line, group in part.groupby("line", sort=True):
                means = group.groupby("layer")[column].mean()
                ax.plot(means.index, means.values, marker="o", markersize=3, linewidth=1,
                        label=line if i == 0 else None, color=colours[line])
        ax.set_title(f"{column} by layer" + (" (mean per part)" if by_part else ""))
        ax.set_xlabel("layer")
        ax.set_ylabel(column)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 if len(labels) <= 8 else 0.14, 1, 1))
    return fig


def plot_near_zero(activations: pd.DataFrame) -> Figure:
    """Near-zero fractions of each layer's projection outputs (and block output) by layer."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    projections = activations[activations["kind"] == "projection"]
    for role, group in projections.groupby("role"):
        ax.plot(group["layer"], group["near_zero_fraction"], marker="o", markersize=3, linewidth=1, label=str(role))
    blocks = activations[activations["kind"] == "block"]
    if len(blocks):
        ax.plot(blocks["layer"], blocks["near_zero_fraction"], color="black", linewidth=2, label="block output")
    rel = activations.attrs.get("rel_eps", 0.1)
    ax.set_title(f"near-zero fraction (|x| ≤ {rel} × token RMS)")
    ax.set_xlabel("layer")
    ax.set_ylabel("near_zero_fraction")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_allocations(plans: dict) -> Figure:
    """Experts and ranks by layer for several plans side by side; accounting in the legend."""
    fig, (experts_ax, ranks_ax) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(plans), 1)
    for i, (name, plan) in enumerate(plans.items()):
        layers = [layer["layer"] for layer in plan.layers]
        experts = [layer["experts"] for layer in plan.layers]
        ranks = [np.mean([m["rank"] for m in layer["modules"]]) for layer in plan.layers]
        acct = plan.accounting
        label = (f"{name}: trainable {acct['trainable']['total']:,}, "
                 f"active {acct['active_per_token']['total']:,}")
        offset = (i - (len(plans) - 1) / 2) * width
        experts_ax.bar(np.asarray(layers) + offset, experts, width=width, label=label)
        ranks_ax.bar(np.asarray(layers) + offset, ranks, width=width, label=name)
    from matplotlib.ticker import MaxNLocator

    experts_ax.set_title("experts per layer")
    experts_ax.set_ylabel("experts")
    ranks_ax.set_title("rank per layer (mean over modules)")
    ranks_ax.set_ylabel("rank")
    for ax in (experts_ax, ranks_ax):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    # Below the panels, never over the bars: one row per plan with its trainable/active parameters.
    handles, labels = experts_ax.get_legend_handles_labels()
    rows = max(1, -(-len(labels) // 2))
    fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.055 * rows + 0.02, 1, 1))
    return fig


def plot_eval_curves(comparison: dict) -> Figure:
    """A plan comparison's validation metric against training steps: per arm the mean over seeds (line) and the
    range over seeds (band); baselines dashed, the dense arm dotted."""
    from matplotlib.ticker import MaxNLocator

    kinds = {row["arm"]: row["kind"] for row in comparison.get("arms", [])}
    styles = {"baseline": ("--", 2.0), "dense": (":", 1.8)}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, by_seed in comparison["curves"].items():
        curves = [np.asarray(points, dtype=float) for points in by_seed.values()]
        steps = curves[0][:, 0]
        values = np.vstack([c[:, 1] for c in curves if len(c) == len(steps)])
        style, width = styles.get(kinds.get(name, ""), ("-", 1.5))
        line, = ax.plot(steps, values.mean(axis=0), linewidth=width, linestyle=style,
                        label=f"{name} (n={len(values)})")
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel(comparison["metric"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{comparison['metric']} on the validation rows (mean over seeds, band = range)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_budget_curves(comparison: dict) -> Figure:
    """A budget curve: each arm's test metric (mean over seeds, 95 % interval as error bars) against its trainable
    parameters (log scale), one line per strategy and one per baseline across the budgets; baselines dashed."""
    lines: dict[str, list[dict]] = {}
    for row in comparison["arms"]:
        if row["kind"] == "baseline":
            served = ", ".join(sorted(set(row.get("compared") or []))) or "?"
            key = f"uniform for {served}"
        else:
            key = row.get("family") or row["arm"]
        lines.setdefault(key, []).append(row)
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for key, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["trainable"])
        x = np.asarray([r["trainable"] for r in rows], dtype=float)
        y = np.asarray([r["mean"] for r in rows], dtype=float)
        low = np.asarray([r["ci95_low"] if r["ci95_low"] is not None else r["mean"] for r in rows], dtype=float)
        high = np.asarray([r["ci95_high"] if r["ci95_high"] is not None else r["mean"] for r in rows], dtype=float)
        baseline = rows[0]["kind"] == "baseline"
        ax.errorbar(x, y, yerr=[np.maximum(y - low, 0), np.maximum(high - y, 0)], marker="o", markersize=4,
                    capsize=3, linewidth=2.0 if baseline else 1.5, linestyle="--" if baseline else "-",
                    label=f"{key} (n={rows[0]['n']})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapters + routers)")
    metric = comparison["metric"]
    ax.set_ylabel(f"test {metric}")
    better = "higher" if comparison.get("higher_is_better") else "lower"
    ax.set_title(f"test {metric} against the budget (mean over seeds, bars = 95 % interval; {better} is better)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_alpha_over_steps(table: pd.DataFrame) -> Figure:
    """α over training steps, one line per layer (mean over its matrices), one panel per kind of matrix
    (``delta``: ΔW of the adapters, ``merged``: W + ΔW, ``projection``: the weights of a full fine-tune);
    the metric is the first alpha column the table holds."""
    from matplotlib import colormaps

    column = next((c for c in ("alpha_hill", "alpha", "alpha_peak") if c in table.columns and table[c].notna().any()),
                  None)
    if column is None:
        raise LayerscopeError("the training-spectra table has no alpha values (every scan failed?)")
    watched = table[table["layer"].notna()]
    steps_seen = watched.groupby("kind")["step"].nunique()
    kinds = [k for k in ("delta", "merged", "projection", "expert") if k in steps_seen.index and steps_seen[k] > 1]
    kinds = kinds or list(steps_seen.index[:1])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.9), squeeze=False)
    layers = sorted(int(v) for v in watched["layer"].unique())
    colours = colormaps["viridis"]
    for ax, kind in zip(axes[0], kinds):
        rows = watched[watched["kind"] == kind]
        for i, layer in enumerate(layers):
            means = rows[rows["layer"] == layer].groupby("step")[column].mean().dropna()
            if len(means):
                ax.plot(means.index, means.values, marker="o", markersize=3, linewidth=1.2,
                        color=colours(i / max(1, len(layers) - 1)), label=f"layer {layer}")
        ax.set_title({"delta": f"{column} of ΔW (adapters)", "merged": f"{column} of W + ΔW"}.get(
            kind, f"{column} of the weights"))
        ax.set_xlabel("step")
        ax.set_ylabel(column)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 if len(labels) <= 8 else 0.16, 1, 1))
    return fig
