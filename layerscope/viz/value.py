"""``value.png``: what extra capacity in each group of layers was worth, and each planning signal beside it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PER = 1e6  # values are shown per million parameters


def plot_layer_value(document: dict) -> Figure:
    """Top: the gain of doubling each group and the loss of dropping it, per million parameters, with 95 %
    intervals over seeds.  Bottom: each signal normalised to [0, 1] over the groups, with its Spearman ρ."""
    groups = document["groups"]
    x = np.arange(len(groups))
    labels = [_label(group["layers"]) for group in groups]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(groups) + 3), 7.5), sharex=True)
    for offset, estimate, colour, name in ((-0.15, "add", "tab:blue", "add g: doubled"),
                                          (0.15, "drop", "tab:orange", "drop g: removed")):
        means = np.array([_number(g[estimate]["per_param"]["mean"]) for g in groups]) * PER
        low = np.array([_number(g[estimate]["per_param"]["ci95_low"]) for g in groups]) * PER
        high = np.array([_number(g[estimate]["per_param"]["ci95_high"]) for g in groups]) * PER
        top.errorbar(x + offset, means, yerr=[means - low, high - means], fmt="o", color=colour, capsize=4,
                     label=name)
    top.axhline(0, color="grey", linewidth=0.8)
    differ = document["differ"]["add"]
    sign = "gain" if document["higher_is_better"] else "loss reduction"
    top.set_ylabel(f"{document['metric']} {sign}\nper million parameters")
    p = differ.get("p")
    top.set_title(f"Value of capacity per group at {document['budget']['label']} ({document['uniform']['arm']}), "
                  f"{len(document['seeds'])} seeds, validation rows\n"
                  f"groups differ: F = {_fmt(differ.get('F'))}, p = {_fmt(p)}; "
                  f"spread {_fmt(differ.get('spread_ratio'))}× seed noise", fontsize=10)
    top.legend(fontsize=8)
    for signal in document.get("signals", []):
        values = np.array([_number(v) for v in signal["per_group"]])
        span = np.nanmax(values) - np.nanmin(values) if np.isfinite(values).any() else 0
        normalised = (values - np.nanmin(values)) / span if span > 0 else np.full_like(values, 0.5)
        rho = signal["add"]["spearman"]
        bottom.plot(x, normalised, marker=".", label=f"{signal['signal']} (ρ {_fmt(rho)} "
                    f"[{_fmt(signal['add']['ci95_low'])}, {_fmt(signal['add']['ci95_high'])}])")
    bottom.set_ylabel("signal, normalised over groups")
    bottom.set_xlabel("group (layers)")
    bottom.set_xticks(x, labels)
    if document.get("signals"):
        bottom.legend(fontsize=7, ncol=2, title="Spearman ρ with the add value (95 % bootstrap)", title_fontsize=7)
    else:
        bottom.text(0.5, 0.5, "signals not measured", ha="center", va="center", transform=bottom.transAxes)
    fig.tight_layout()
    return fig


def _label(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}–{layers[-1]}"


def _number(value) -> float:
    return float(value) if value is not None else float("nan")


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3g}"
