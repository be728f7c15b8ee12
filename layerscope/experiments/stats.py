"""The statistics of a plan comparison: per plan over seeds, and paired against the uniform plan.

* per plan: mean, sample standard deviation (n − 1) and the 95 % confidence interval of the mean,
  mean ± t(0.975, n − 1) · sd / √n (Student's t; no interval for one seed);
* paired with uniform: d_s = metric(plan, seed s) − metric(uniform, seed s) over the seeds both ran;
  mean d, its 95 % interval, and the paired t-test's two-sided p-value (t = mean d / (sd_d / √n)).
  A plan "beats uniform" when mean d > 0 (for a metric where higher is better) and p < 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Paired:
    n: int
    mean_difference: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float


def summarise(values: list[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t_quantile(n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def paired(plan: list[float], uniform: list[float]) -> Paired:
    """Plan minus uniform, seed by seed (the two lists are aligned by seed)."""
    differences = [a - b for a, b in zip(plan, uniform)]
    summary = summarise(differences)
    if summary.n < 2:
        return Paired(summary.n, summary.mean, math.nan, math.nan, math.nan, math.nan)
    if summary.sd == 0:
        t = math.inf if summary.mean != 0 else 0.0
        return Paired(summary.n, summary.mean, summary.mean, summary.mean, t, 0.0 if summary.mean != 0 else 1.0)
    t = summary.mean / (summary.sd / math.sqrt(summary.n))
    from scipy import stats

    p = float(2 * stats.t.sf(abs(t), summary.n - 1))
    return Paired(summary.n, summary.mean, summary.ci_low, summary.ci_high, t, p)


def _t_quantile(dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(1 - ALPHA / 2, dof))


def verdict(pairs: dict[str, Paired], higher_is_better: bool, budget: int | None, seeds: int) -> str:
    """One sentence a user can act on, honest about a tie."""
    sign = 1 if higher_is_better else -1
    better = sorted(name for name, p in pairs.items() if p.n >= 2 and sign * p.mean_difference > 0
                    and p.p_value < ALPHA)
    worse = sorted(name for name, p in pairs.items() if p.n >= 2 and sign * p.mean_difference < 0
                   and p.p_value < ALPHA)
    at = f" at {budget:,} trainable parameters" if budget else ""
    if better:
        text = f"{', '.join(better)} beat{'s' if len(better) == 1 else ''} uniform{at} over {seeds} seeds (paired t-test, p < {ALPHA})"
    else:
        text = f"no plan is better than uniform{at} with {seeds} seeds (paired t-test, p < {ALPHA})"
    if worse:
        text += f"; worse than uniform: {', '.join(worse)}"
    return text + "."
