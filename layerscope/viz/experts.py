"""Mixture-of-experts layers as their users look at them: a layer × expert heatmap of alpha, and the experts
that stand out (Tukey's fences, :func:`layerscope.spectral.columns.expert_spread`)."""

from __future__ import annotations

import html

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from layerscope.spectral.columns import expert_spread  # noqa: E402


def has_experts(table: pd.DataFrame) -> bool:
    return bool(((table["kind"] == "expert") & table["layer"].notna() & table["expert"].notna()).any())


def plot_expert_heatmap(table: pd.DataFrame) -> Figure:
    """Layer (rows) × expert (columns): each expert's alpha, the mean over its projections; blank where an
    expert has no fit."""
    experts = table[(table["kind"] == "expert") & table["layer"].notna() & table["expert"].notna()]
    grid = experts.assign(layer=experts["layer"].astype(int), expert=experts["expert"].astype(int)).pivot_table(
        index="layer", columns="expert", values="alpha", aggfunc="mean")
    height = max(2.5, 0.22 * len(grid) + 1.5)
    width = max(5.0, min(18.0, 0.12 * grid.shape[1] + 3))
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(np.ma.masked_invalid(grid.to_numpy(dtype=float)), aspect="auto", cmap="viridis",
                      interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(grid)), [str(i) for i in grid.index])
    if grid.shape[1] <= 32:
        ax.set_xticks(range(grid.shape[1]), [str(j) for j in grid.columns])
    ax.set_title("α per expert (mean over its projections)")
    fig.colorbar(image, ax=ax, label="α")
    fig.tight_layout()
    return fig


def outlier_html(table: pd.DataFrame, shown: int = 40) -> str:
    """The experts outside Tukey's fences per layer and projection, as an HTML list."""
    spread = expert_spread(table)
    if spread.empty or "outlier_experts" not in spread.columns:
        return "<p>No expert's α could be fitted.</p>"
    items = []
    for row in spread.itertuples():
        for name in row.outlier_experts:
            value = float(table.loc[table["name"] == name, "alpha"].iloc[0])
            side = "heavier tail" if value < row.alpha_q1 else "lighter tail"
            items.append(f"<li><code>{html.escape(name)}</code>: α {value:.2f} ({side}; layer {row.layer} "
                         f"{html.escape(str(row.role))}: median {row.alpha_median:.2f}, quartiles "
                         f"{row.alpha_q1:.2f}–{row.alpha_q3:.2f})</li>")
    if not items:
        return "<p>No expert lies outside Tukey's fences (1.5 interquartile ranges) of its layer and projection.</p>"
    more = f"<p>… and {len(items) - shown} more (scan.csv).</p>" if len(items) > shown else ""
    return f"<p>{len(items)} experts outside Tukey's fences of their layer and projection:</p><ul>" + \
        "".join(items[:shown]) + "</ul>" + more
