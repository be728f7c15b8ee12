"""The statistics of a layer-value measurement: per group over seeds, whether the groups differ, and signals.

* Per group: the mean over seeds of a paired quantity (gain of ``add g`` over U, loss of ``drop g``, per
  parameter) with its 95 % Student-t interval, mean ± t(0.975, n − 1) · sd / √n.
* Do the groups differ at all?  A repeated-measures one-way ANOVA with seeds as subjects: the G × n table of
  values per parameter, SS_groups = n Σ_g (ȳ_g − ȳ)², SS_seeds = G Σ_s (ȳ_s − ȳ)², SS_error the rest,
  F = (SS_groups / (G − 1)) / (SS_error / ((G − 1)(n − 1))) against F(G − 1, (G − 1)(n − 1)); and Friedman's rank
  test (no normality assumed, G ≥ 3).  Beside them, the spread of the group means against what seed noise alone
  gives a group mean, sd(ȳ_g) / √(MS_error / n): near 1, the differences between groups are the seeds' noise.
* Each signal against value: Spearman's ρ between the signal per group and the mean value per group, with a
  percentile bootstrap interval over seeds (seeds resampled with replacement, 2,000 times, fixed generator).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05
BOOTSTRAP = 2_000


def interval(values: list[float]) -> dict:
    """Mean, sd and the 95 % t interval over seeds, with the per-seed values."""
    array = np.asarray(values, dtype=float)
    n = len(array)
    mean = float(array.mean())
    sd = float(array.std(ddof=1)) if n > 1 else math.nan
    half = float(scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "ci95_low": mean - half, "ci95_high": mean + half,
            "values": [float(v) for v in array]}


def groups_differ(values: list[list[float]]) -> dict:
    """The repeated-measures test that the groups' values differ (rows: groups, columns: seeds)."""
    table = np.asarray(values, dtype=float)
    groups, seeds = table.shape
    grand = table.mean()
    ss_groups = seeds * float(((table.mean(axis=1) - grand) ** 2).sum())
    ss_seeds = groups * float(((table.mean(axis=0) - grand) ** 2).sum())
    ss_error = float(((table - grand) ** 2).sum()) - ss_groups - ss_seeds
    df_groups, df_error = groups - 1, (groups - 1) * (seeds - 1)
    ms_error = ss_error / df_error if df_error > 0 else math.nan
    f = (ss_groups / df_groups) / ms_error if df_error > 0 and ms_error > 0 else math.nan
    p = float(scipy_stats.f.sf(f, df_groups, df_error)) if math.isfinite(f) else math.nan
    varies = np.ptp(table, axis=0).any()  # Friedman's statistic is 0/0 when every seed ranks all groups equal
    friedman = scipy_stats.friedmanchisquare(*table) if groups >= 3 and seeds >= 2 and varies else None
    noise = math.sqrt(ms_error / seeds) if math.isfinite(ms_error) else math.nan
    spread = float(table.mean(axis=1).std(ddof=1)) if groups > 1 else math.nan
    return {"test": "repeated-measures ANOVA (seeds as subjects)", "F": f, "df": [df_groups, df_error], "p": p,
            "friedman_chi2": float(friedman.statistic) if friedman else None,
            "friedman_p": float(friedman.pvalue) if friedman else None,
            "between_groups_sd": spread, "seed_noise_se": noise,
            "spread_ratio": spread / noise if noise and math.isfinite(noise) else math.nan,
            "differ": bool(math.isfinite(p) and p < ALPHA)}


def agreement(add: list[list[float]], drop: list[list[float]]) -> dict:
    """Do the two independent estimates rank the groups alike?  Spearman's ρ of their group means."""
    return {"spearman": _spearman(np.mean(add, axis=1), np.mean(drop, axis=1)),
            "why": "add (doubling a group) and drop (removing it) are independent runs; agreement is evidence "
                   "that the value is the group's, not the noise's"}


def signal_correlations(measured: dict, per_param: dict[str, list[list[float]]]) -> list[dict]:
    """Per signal and estimate: ρ(signal per group, mean value per group) with its bootstrap interval over seeds."""
    rows = []
    generator = np.random.default_rng(0)
    seeds = len(per_param["add"][0])
    draws = generator.integers(0, seeds, size=(BOOTSTRAP, seeds))
    for name, signal in measured.items():
        values = np.asarray(signal["per_group"], dtype=float)
        row = {"signal": name, "direction": signal.get("direction"), "claim": signal.get("claim"),
               "per_group": [float(v) for v in values]}
        for estimate, table in per_param.items():
            table = np.asarray(table, dtype=float)
            rho = _spearman(values, table.mean(axis=1))
            boot = np.array([_spearman(values, table[:, draw].mean(axis=1)) for draw in draws])
            boot = boot[np.isfinite(boot)]
            low, high = (np.percentile(boot, [2.5, 97.5]) if len(boot) else (math.nan, math.nan))
            row[estimate] = {"spearman": rho, "ci95_low": float(low), "ci95_high": float(high)}
        rows.append(row)
    return rows


def _spearman(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return float(np.corrcoef(scipy_stats.rankdata(x), scipy_stats.rankdata(y))[0, 1])


def verdict(document: dict) -> str:
    """One paragraph: do the groups differ, which groups carry value, and which signal tracks it."""
    differ = document["differ"]["add"]
    groups = document["groups"]
    best = max(groups, key=lambda g: g["add"]["per_param"]["mean"])
    clear = [g["group"] for g in groups if g["add"]["per_param"]["ci95_low"] > 0]
    seeds = len(document["seeds"])
    if not math.isfinite(differ["p"]):
        head = f"With {seeds} seeds the groups cannot be tested against each other."
    elif differ["differ"]:
        head = (f"The groups differ in value (add: F = {differ['F']:.2f}, p = {differ['p']:.3g}; spread "
                f"{differ['spread_ratio']:.1f}× seed noise): where capacity sits matters on this task.")
    else:
        head = (f"No difference between groups is detectable (add: F = {differ['F']:.2f}, p = {differ['p']:.3g}; "
                f"spread {differ['spread_ratio']:.1f}× seed noise): at this budget the layers look interchangeable, "
                "and no signal can be expected to beat uniform.")
    dropped = document["differ"].get("drop") or {}
    if math.isfinite(dropped.get("p", math.nan)):
        head += (f" The independent drop estimate: F = {dropped['F']:.2f}, p = {dropped['p']:.3g}"
                 f"{' (the groups differ)' if dropped['differ'] else ''}.")
    gains = (f" Doubling group {best['group']} (layers {_span(best['layers'])}) gained most per parameter; "
             + (f"groups {clear} gained with 95 % confidence." if clear else "no group's gain is clear of zero."))
    signals = ""
    if document.get("signals"):
        tracking = {estimate: [s["signal"] for s in document["signals"] if _tracks(s, estimate)]
                    for estimate in ("add", "drop")}
        found = [f"{estimate}: {', '.join(names)}" for estimate, names in tracking.items() if names]
        signals = (" Signals whose rank correlation with value has the sign their strategy assumes, its 95 % "
                   f"interval clear of zero: {'; '.join(found)}." if found else
                   " No signal's rank correlation with value is clear of zero in the direction its strategy assumes.")
        if seeds < 5:
            signals += (f" (With {seeds} seeds a bootstrap over seeds has few distinct resamples: read these intervals "
                        "as rough, and a correlation with values the groups do not differ in as noise.)")
    return head + gains + signals


def _tracks(signal: dict, estimate: str) -> bool:
    direction, value = signal.get("direction"), signal.get(estimate) or {}
    low, high = value.get("ci95_low"), value.get("ci95_high")
    if not direction or low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return False
    return low * direction > 0 and high * direction > 0


def _span(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}–{layers[-1]}"
