"""The statistics of a plan comparison: per arm over seeds, and each strategy paired with its own baseline.

* Per arm: mean, sample standard deviation (n − 1) and a 95 % interval of the mean.  For an unbounded
  metric (evaluation loss) it is Student's t interval, mean ± t(0.975, n − 1) · sd / √n.  For a bounded
  one (accuracy) a t interval can leave [0, 1] with few seeds, so it is the percentile bootstrap of the
  mean over seeds (20,000 resamples, fixed generator): it stays inside the values observed.  No interval
  for fewer than two seeds.
* Paired with the baseline: d_s = metric(strategy, seed s) − metric(baseline, seed s).  With n ≥ 3 seeds
  and a non-zero spread of d: mean d, its 95 % t interval and the two-sided paired t-test,
  t = mean d / (sd_d / √n).  With fewer seeds, or identical differences on every seed (sd_d = 0: a
  t-test has no variance to test), the comparison is *not testable* and says why — never p = 0.
* Several strategies against baselines: Holm's step-down correction of the p-values (family-wise
  error 5 %); a strategy "beats" its baseline when its corrected p < 0.05 and the difference points the
  metric's good way.
* Minimum detectable effect (MDE): the true mean difference a paired t-test with these n seeds would
  detect with 80 % power at α = 0.05 (two-sided), given the observed sd_d.  Power is computed exactly
  from the noncentral t distribution (noncentrality δ√n / sd_d); for large n the MDE tends to the
  normal-theory (z₀.₉₇₅ + z₀.₈) · sd_d / √n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05
POWER = 0.80
MIN_SEEDS_FOR_TEST = 3
BOOTSTRAP_RESAMPLES = 20_000


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    interval: str | None  # "t", "bootstrap", or None (fewer than two seeds)


@dataclass(frozen=True)
class Paired:
    n: int
    mean_difference: float
    sd: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float
    mde: float
    testable: bool
    reason: str  # why not testable ("" when testable)
    p_holm: float = math.nan

    def with_holm(self, adjusted: float) -> Paired:
        from dataclasses import replace

        return replace(self, p_holm=adjusted)


def summarise(values: list[float], bounds: tuple[float, float] | None = None) -> Summary:
    """Mean, sd and a 95 % interval; ``bounds`` (e.g. (0, 1) for accuracy) selects the bootstrap interval."""
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, None)
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if bounds is not None:
        low, high = bootstrap_interval(values)
        return Summary(n, mean, sd, low, high, "bootstrap")
    half = t_quantile(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half, "t")


def bootstrap_interval(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean (deterministic: a fixed generator)."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


def paired(strategy: list[float], baseline: list[float]) -> Paired:
    """Strategy minus baseline, seed by seed (the two lists are aligned by seed)."""
    differences = [a - b for a, b in zip(strategy, baseline)]
    n = len(differences)
    mean = sum(differences) / n if n else math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) if n > 1 else math.nan
    if n < MIN_SEEDS_FOR_TEST:
        reason = f"{n} seed{'s' if n != 1 else ''}: a paired t-test needs {MIN_SEEDS_FOR_TEST} or more"
        return Paired(n, mean, sd, math.nan, math.nan, math.nan, math.nan, math.nan, False, reason)
    if sd == 0:
        reason = ("identical results on every seed" if mean == 0 else
                  f"the same difference ({mean:+.4g}) on every seed: no variance to test")
        return Paired(n, mean, sd, math.nan, math.nan, math.nan, math.nan, math.nan, False, reason)
    from scipy import stats

    se = sd / math.sqrt(n)
    t = mean / se
    p = float(2 * stats.t.sf(abs(t), n - 1))
    half = t_quantile(1 - ALPHA / 2, n - 1) * se
    return Paired(n, mean, sd, mean - half, mean + half, t, p, minimum_detectable_effect(sd, n), True, "")


def minimum_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired t-test on ``n`` pairs detects with ``power``."""
    from scipy import optimize, stats

    if n < 2 or not sd > 0:
        return math.nan
    dof = n - 1
    critical = stats.t.ppf(1 - alpha / 2, dof)

    def shortfall(effect: float) -> float:
        shift = effect * math.sqrt(n) / sd
        exact = float(stats.nct.sf(critical, dof, shift) + stats.nct.cdf(-critical, dof, shift))
        if math.isnan(exact):  # scipy's noncentral t fails for very many degrees of freedom: the normal limit
            exact = float(stats.norm.sf(critical - shift) + stats.norm.cdf(-critical - shift))
        return exact - power

    high = sd
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-12 * sd))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values: p_(i) ordered ascending, adj_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    m, running, adjusted = len(ordered), 0.0, {}
    for j, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (m - j) * p))
        adjusted[name] = running
    return adjusted


def corrected(pairs: dict[str, Paired]) -> dict[str, Paired]:
    """Every pair with its Holm-adjusted p-value over the testable pairs of the family."""
    adjusted = holm({name: pair.p_value for name, pair in pairs.items() if pair.testable})
    return {name: pair.with_holm(adjusted.get(name, math.nan)) for name, pair in pairs.items()}


def t_quantile(q: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, dof))


def verdict(comparisons: dict[str, tuple[str, Paired]], higher_is_better: bool, seeds: int, metric: str) -> str:
    """What the data say, strategy by strategy against its own baseline, and what they rule out."""
    sign = 1 if higher_is_better else -1
    if not comparisons:
        return "no strategy arm to compare."
    adjusted = corrected({name: pair for name, (_, pair) in comparisons.items()})
    sentences = []
    for name, (baseline, _) in comparisons.items():
        pair = adjusted[name]
        if not pair.testable:
            sentences.append(f"{name} vs {baseline}: not testable ({pair.reason})")
            continue
        good = sign * pair.mean_difference > 0
        significant = pair.p_holm < ALPHA
        lead = (("beats" if good else "is worse than") if significant else "no significant difference from")
        span = f"{pair.mean_difference:+.4f} {metric} (95 % CI {pair.ci_low:+.4f} to {pair.ci_high:+.4f})"
        rules = _ruled_out(pair, sign, metric)
        sentences.append(f"{name} {lead} {baseline}: {span}, Holm-corrected p = {pair.p_holm:.3g}; {rules}; "
                         f"MDE at 80 % power {pair.mde:.4f}")
    return f"Over {seeds} seed{'' if seeds == 1 else 's'} — " + ". ".join(sentences) + "."


def _ruled_out(pair: Paired, sign: int, metric: str) -> str:
    """The interval's ends, read as claims the data exclude (at 95 %)."""
    best, worst = (pair.ci_high, pair.ci_low) if sign > 0 else (pair.ci_low, pair.ci_high)
    gain_bound, loss_bound = sign * best, -sign * worst
    parts = []
    parts.append(f"gains above {gain_bound:.4f}" if gain_bound > 0 else "any gain")
    parts.append(f"losses above {loss_bound:.4f}" if loss_bound > 0 else "any loss")
    return "rules out " + " and ".join(parts)
