"""The scan table's columns and the per-layer summary (AlphaLoRA's layer means)."""

from __future__ import annotations

import math

import pandas as pd

from layerscope import names
from layerscope.checkpoint.naming import TARGET_KINDS

# parameter: for an expert matrix, the live 3-D parameter holding it (what PEFT's target_parameters names)
IDENTITY_COLUMNS = ["name", "tensor", "file", "kind", "stack", "layer", "stack_layer", "role", "mixer", "module", "expert",
                    "parameter", "part", "dtype", "quantization", "shape", "out_features", "in_features"]


FIT_COLUMNS = {
    "alpha": ["alpha", "xmin", "D", "sigma", "num_pl_spikes"],
    "alpha_hill": ["alpha_hill", "xmin_hill"],
    "alpha_peak": ["alpha_peak", "xmin_peak", "D_peak"],
    "alpha_farms": ["alpha_farms", "xmin_farms", "num_evals_farms"],
    "mp": ["num_spikes", "sigma_mp", "mp_softrank", "bulk_max", "bulk_min", "W_scale"],
    "rand": ["rand_distance", "num_rand_spikes", "max_rand_eval", "rand_mp_softrank", "ww_softrank"],
    "rank": ["matrix_rank", "rank_loss", "weak_rank_loss", "sv_max", "sv_min"],
    "detx": ["detX_num", "detX_val", "detX_val_unrescaled", "num_ERG_spikes", "ERG_gap"],
    "vectors": [f"{side}_{stat}_{metric}" for metric in ("vec_entropy", "loc_ratio", "part_ratio")
                for side in ("bulk", "tail") for stat in ("mean", "var")],
    "tpl": ["alpha_tpl", "Lambda", "xmin_tpl"],
    "e_tpl": ["alpha_e_tpl", "Lambda_e_tpl", "xmin_e_tpl"],
}


METRIC_COLUMNS = ["lambda_max", "log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm",
                  "stable_rank", "entropy", "warning"]


SUMMARY_COLUMNS = ["alpha", "alpha_hill", "alpha_peak", "alpha_farms", "mp_softrank", "num_spikes", "rand_distance",
                   "num_rand_spikes", "lambda_max", "log_norm", "log_spectral_norm", "alpha_weighted",
                   "log_alpha_norm", "stable_rank", "entropy"]


# Norm metrics built on WeightWatcher's alpha: only written when that estimator runs.
ALPHA_NORM_COLUMNS = ("alpha_weighted", "log_alpha_norm", "warning")


def scan_columns(estimators: tuple[str, ...], fix_fingers: bool = False, kernels: bool = False) -> list[str]:
    """The table's columns; ``kernels``: it has convolution rows, which carry their receptive field ``rf``."""
    cols = IDENTITY_COLUMNS + ["N", "M", "num_evals"] + (["rf"] if kernels else [])
    for name in ALL_ESTIMATORS:
        if name in estimators:
            cols += FIT_COLUMNS[name]
            if name == "alpha" and fix_fingers:
                cols += ["num_fingers", "raw_alpha"]
    metrics = [c for c in METRIC_COLUMNS if "alpha" in estimators or c not in ALPHA_NORM_COLUMNS]
    return cols + metrics + ["status", "precision", "note"]


def _mixers(values: pd.Series) -> str | None:
    """The token mixer kinds of one layer (``attention``, ``mamba``, ``linear_attention+attention`` ...)."""
    kinds = sorted(set(values.dropna()))
    return "+".join(kinds) if kinds else None


ADAPTER_KINDS = frozenset({"delta", "merged"})  # rows of an adapter scan: ΔW, and W + ΔW with --base


def layer_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per-layer means over every adapter-target matrix of the layer: projections and each expert's matrices.

    A diagnostic, not the planner's v_i: a plan's v_i (the ``v_i`` column of ``layerscope explain``, the plan's
    per-layer ``metric``) averages only the modules the plan adapts (its target roles), so on a mixture-of-experts
    model, whose expert matrices are not planned, the two differ.  Failed matrices (NaN metrics) are left out of the means and counted in ``num_failed``.
    An adapter scan with its base (ΔW and W + ΔW rows) gets one row per kind and layer, with a ``kind`` column.
    A mixture-of-experts layer also gets the spread of alpha over its experts' matrices (``expert_alpha_min``,
    ``_q1``, ``_median``, ``_q3``, ``_max``, and ``expert_alpha_outliers`` by Tukey's fences); per projection,
    and for log_norm too, see :func:`expert_spread`.
    """
    targets = table[table["kind"].isin(TARGET_KINDS | ADAPTER_KINDS) & table["layer"].notna()]
    present = [c for c in SUMMARY_COLUMNS if c in targets.columns]
    kinds = set(targets["kind"]) & ADAPTER_KINDS
    # An adapter scanned with its base holds ΔW rows (rank r: often too few eigenvalues for a fit) and W + ΔW
    # rows: each kind is summarised apart, so one kind's missing fits never blank the other's.
    apart = bool(kinds) and len(set(targets["kind"])) > 1
    keys = [targets["kind"].rename("kind"), targets["layer"].astype(int)] if apart else [targets["layer"].astype(int)]
    grouped = targets.groupby(keys, sort=True)
    summary = grouped[present].mean()
    summary.insert(0, "stack", grouped["stack"].first())
    summary.insert(1, "stack_layer", grouped["stack_layer"].first().astype("Int64"))
    summary.insert(2, "mixer", grouped["mixer"].agg(_mixers) if "mixer" in targets.columns else None)
    summary.insert(3, "num_matrices", grouped.size())
    summary.insert(4, "num_failed", grouped["status"].apply(lambda s: int((s != "ok").sum())))
    summary = summary.reset_index()
    if not apart and "alpha" in targets.columns and (targets["kind"] == "expert").any():
        summary = summary.merge(_expert_columns(targets), on="layer", how="left")
    summary.attrs.update(table.attrs)
    return summary


EXPERT_SPREAD_METRICS = ("alpha", "log_norm")
TUKEY = 1.5  # an outlier lies beyond 1.5 interquartile ranges from the quartiles


def expert_spread(table: pd.DataFrame) -> pd.DataFrame:
    """For every MoE layer and projection (``gate``, ``up``, ``down`` …): how its experts spread — the number of
    experts, then per metric (alpha, log_norm) the min, quartiles, median and max, and the experts outside
    Tukey's fences (q1 − 1.5·IQR, q3 + 1.5·IQR) as a count and, for alpha, by name."""
    experts = table[(table["kind"] == "expert") & table["layer"].notna()]
    rows = []
    for (layer, role), group in experts.groupby([experts["layer"].astype(int), experts["role"].astype(str)], sort=True):
        row: dict = {"layer": layer, "role": role, "experts": len(group)}
        for metric in (m for m in EXPERT_SPREAD_METRICS if m in group.columns):
            stats, outliers = _spread(group, metric)
            row.update({f"{metric}_{key}": value for key, value in stats.items()})
            row[f"{metric}_outliers"] = len(outliers)
            if metric == "alpha":
                row["outlier_experts"] = list(outliers)
        rows.append(row)
    return pd.DataFrame(rows)


def _spread(group: pd.DataFrame, metric: str) -> tuple[dict, list[str]]:
    values = group[metric].astype(float)
    finite = values.dropna()
    if finite.empty:
        return {k: math.nan for k in ("min", "q1", "median", "q3", "max")}, []
    q1, median, q3 = (float(v) for v in finite.quantile([0.25, 0.5, 0.75]))
    low, high = q1 - TUKEY * (q3 - q1), q3 + TUKEY * (q3 - q1)
    outside = group.loc[(values < low) | (values > high), "name"]
    return {"min": float(finite.min()), "q1": q1, "median": median, "q3": q3, "max": float(finite.max())}, list(outside)


def _expert_columns(targets: pd.DataFrame) -> pd.DataFrame:
    """Per MoE layer, the spread of alpha over all its expert matrices (every projection together)."""
    experts = targets[targets["kind"] == "expert"]
    rows = []
    for layer, group in experts.groupby(experts["layer"].astype(int)):
        stats, outliers = _spread(group, "alpha")
        rows.append({"layer": layer, **{f"expert_alpha_{k}": v for k, v in stats.items()},
                     "expert_alpha_outliers": len(outliers)})
    return pd.DataFrame(rows)


# Estimators that need the matrix itself (layerscope.spectral.rmt), not only its eigenvalues.
MATRIX_ESTIMATORS = names.MATRIX_ESTIMATORS


ALL_ESTIMATORS = names.ALL_ESTIMATORS


def not_analysed(matrices: pd.DataFrame, shown: int = 3) -> str:
    """How many matrices were not analysed and why, for a summary line: ``1 not analysable — too_few_evals:
    embeddings.token_type_embeddings.weight`` (names while few, else counts per status)."""
    failed = matrices[matrices["status"] != "ok"]
    if failed.empty:
        return "all analysed"
    if len(failed) <= shown:
        reasons = "; ".join(f"{status}: {', '.join(map(str, group['name']))}"
                            for status, group in failed.groupby("status", sort=True))
    else:
        reasons = ", ".join(f"{status}: {count}" for status, count in failed["status"].value_counts().sort_index().items())
        reasons += "; see the status and note columns"
    return f"{len(failed)} not analysable — {reasons}"
