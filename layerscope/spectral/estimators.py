"""Power-law tail estimators of an empirical spectral density.

Three different "alphas" are in use and they are NOT interchangeable:

* ``alpha_hill``  TempBalance ``xmin_mid``: Hill estimator with xmin at the median eigenvalue.
* ``alpha_peak``  AlphaLoRA ``fix_finger`` / TempBalance ``xmin_peak``: KS scan restricted to
                  a window around the peak of the log-histogram.
* ``alpha``       WeightWatcher 0.7.x default (``pl_package='ww'``): KS scan over every
                  eigenvalue but the largest, after dropping eigenvalues <= 1e-5.

All take the eigenvalues sorted ascending (a NumPy array or a torch tensor on any device) and
work in float64 NumPy: the vectors are short, so per-operation overhead is what costs.

The KS scans return exactly what the full scan over every candidate returns (smallest D,
first on ties), without computing most candidates' D: see :func:`ks_best`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WW_EVALS_THRESH = 1e-5  # WeightWatcher drops eigenvalues at or below this before fitting
WW_SMALL_N = 20  # below this many eigenvalues WeightWatcher switches to its small-N fit
WW_SMALL_N_MIN_TAIL = 8
WW_SMALL_N_KS_OFFSET = 0.868
MIN_EVALS = 8  # fewer eigenvalues than this: no estimator is meaningful
PEAK_BINS = 100
_BLOCK_ELEMENTS = 1 << 20  # 8 MiB of float64 per temporary of the full KS scan
# Branch and bound: the first lower bounds use these tail offsets and absolute positions.
_BOUND_OFFSETS = (1, 2)
_BOUND_GRID = 16
# A bound within this relative distance of the best D may still tie with it after rounding.
_TIE_SLACK = 1e-12


@dataclass(frozen=True)
class TailFit:
    """One power-law tail fit: exponent, where the tail starts, and its KS distance."""

    alpha: float
    xmin: float
    D: float = math.nan
    sigma: float = math.nan
    num_pl_spikes: int | None = None
    note: str | None = None

    @classmethod
    def failed(cls, note: str) -> TailFit:
        return cls(alpha=math.nan, xmin=math.nan, note=note)


def as_eigenvalues(eigs) -> np.ndarray:
    """Ascending eigenvalues, given as an array or a torch tensor, as a float64 NumPy array."""
    if hasattr(eigs, "detach"):
        eigs = eigs.detach().cpu().numpy()
    return np.asarray(eigs, dtype=np.float64)


def _log_spreads(log_x: np.ndarray) -> np.ndarray:
    """sum_{j>=i} (ln x_j - ln x_i) for every i, without cancellation.

    Written as sum_{m>i} (n - m) * (ln x_m - ln x_{m-1}): every term is >= 0, so near-equal
    eigenvalues do not turn the difference of two large sums into rounding noise.
    """
    n = log_x.size
    steps = np.diff(log_x) * np.arange(n - 1, 0, -1, dtype=np.float64)
    return np.append(np.cumsum(steps[::-1])[::-1], 0.0)


def hill_alphas(log_x: np.ndarray, starts: np.ndarray, bias_corrected: bool = False) -> np.ndarray:
    """alpha_i = 1 + k / (sum_{j>=i} ln x_j - k ln x_i), k = n - i (or k-1 on top, bias corrected)."""
    k = (log_x.size - starts).astype(np.float64)
    numerator = k - 1 if bias_corrected else k
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 + numerator / _log_spreads(log_x)[starts]


def _usable(alphas: np.ndarray) -> np.ndarray:
    """Candidates whose D is defined; the references give every other candidate D = 1."""
    return np.isfinite(alphas) & (alphas > 1)


def _deviation(log_x: np.ndarray, start, slope, j) -> np.ndarray:
    """|1 - (x_j/x_i)^(1-alpha_i) - (j-i)/(n-i)| for start i, slope 1-alpha_i and position j >= i.

    The one expression every KS distance and every bound is computed with, so a bound at j is
    bit-for-bit the value the full scan sees at j.
    """
    return np.abs(1 - np.exp(slope * (log_x[j] - log_x[start])) - (j - start) / (log_x.size - start))


def ks_distances(x: np.ndarray, starts: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """D_i = max_{j>=i} |1 - (x_j/x_i)^(1-alpha_i) - (j-i)/(n-i)| for each start i (full scan).

    Rows whose alpha is not a finite number > 1 get D = 1, as in the references.
    """
    n = x.size
    log_x = np.log(x)
    starts = np.asarray(starts)
    out = np.ones(starts.size)
    usable = _usable(alphas)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for first in range(0, starts.size, rows_per_block):
        rows = slice(first, first + rows_per_block)
        s, slope = starts[rows][:, None], np.where(usable[rows], 1 - alphas[rows], 0.0)[:, None]
        cols = np.arange(int(s.min()), n)[None, :]
        dev = _deviation(log_x, s, slope, np.maximum(cols, s))  # j < i repeats j = i, where dev = 0
        out[rows] = np.where(usable[rows], dev.max(axis=1), 1.0)
    return out


def ks_best(x: np.ndarray, starts: np.ndarray, alphas: np.ndarray) -> tuple[int, float]:
    """(index into ``starts``, D) of the smallest KS distance, first on ties — as the full scan.

    Branch and bound with learned probe points.  Every candidate's D is a maximum over its
    tail, so its deviation at any single position j is a lower bound.  Bounds start from a few
    positions; then, repeatedly, the open candidate with the smallest bound is computed exactly,
    the position where its deviation peaked is added to every open candidate's bound (near the
    optimum the D curves of neighbouring candidates peak at the same place, so this bound is
    nearly exact for them), and candidates whose bound exceeds the best exact D are closed.
    Typically a handful of exact scans instead of one per candidate.
    """
    n = x.size
    log_x = np.log(x)
    starts = np.asarray(starts)
    m = starts.size
    usable = _usable(alphas)
    slope = np.where(usable, 1 - alphas, 0.0)
    probes = [np.minimum(starts + k, n - 1) for k in _BOUND_OFFSETS]
    bound = np.zeros(m)
    for j in probes:
        np.maximum(bound, _deviation(log_x, starts, slope, j), out=bound)
    grid = np.unique(np.linspace(0, n - 1, _BOUND_GRID).round().astype(np.int64))
    _raise_bounds(bound, log_x, starts, slope, grid)
    bound[~usable] = 1.0  # exactly their D
    open_ = np.ones(m, dtype=bool)
    best, best_d = -1, math.inf
    while True:
        candidates = open_ & (bound <= best_d * (1 + _TIE_SLACK))
        if not candidates.any():
            return best, best_d
        pick = int(np.argmin(np.where(candidates, bound, np.inf)))
        open_[pick] = False
        if usable[pick]:
            i = int(starts[pick])
            dev = _deviation(log_x, i, slope[pick], np.arange(i, n))
            peak = int(np.argmax(dev))
            d = float(dev[peak])
            _raise_bounds(bound, log_x, starts, slope, np.array([i + peak]), open_ & usable)
        else:
            d = 1.0
        if d < best_d or (d == best_d and pick < best):
            best, best_d = pick, d


def _raise_bounds(bound: np.ndarray, log_x: np.ndarray, starts: np.ndarray, slope: np.ndarray,
                  positions: np.ndarray, rows: np.ndarray | None = None) -> None:
    """bound = max(bound, deviation at each absolute position j) for the given rows (j >= i only)."""
    idx = np.arange(starts.size) if rows is None else np.nonzero(rows)[0]
    if idx.size == 0:
        return
    s = starts[idx][:, None]
    j = positions[None, :]
    dev = _deviation(log_x, s, slope[idx][:, None], np.maximum(j, s))  # j < i repeats j = i: 0
    bound[idx] = np.maximum(bound[idx], dev.max(axis=1))


def alpha_hill(eigs) -> TailFit:
    """TempBalance ``xmin_mid``: i = int(n/2), xmin = eigs[i], Hill estimate of the top half.

    Non-positive eigenvalues are dropped first (the reference takes log(0) = -inf there).
    """
    x = as_eigenvalues(eigs)
    x = x[x > 0]
    n = x.size
    if n < MIN_EVALS:
        return TailFit.failed(f"alpha_hill: {n} positive eigenvalues (< {MIN_EVALS})")
    i = n // 2
    start = np.array([i])
    alphas = hill_alphas(np.log(x), start)
    D = float(ks_distances(x, start, alphas)[0])
    return TailFit(alpha=float(alphas[0]), xmin=float(x[i]), D=D, num_pl_spikes=n - i)


def alpha_peak(eigs, bins: int = PEAK_BINS, xmin_max: float | None = None) -> TailFit:
    """AlphaLoRA ``fix_finger`` (TempBalance ``xmin_peak``).

    xmin2 = 10 ** (left edge of the fullest of ``bins`` log10-histogram bins); candidate
    xmins are the eigenvalues (all but the largest) in [log10(0.95*xmin2), 1.5*xmin2].
    The lower bound is a log10 value compared with raw eigenvalues: that is what the
    reference code does, so it is reproduced here (it makes the lower bound vacuous
    whenever xmin2 < ~1.05).  ``xmin_max`` replaces the upper bound (WeightWatcher's
    ``xmin_max``, raw eigenvalue units).  Among the candidates the alpha with the smallest KS
    distance wins.  Where the reference would return a placeholder (no candidate in the
    window, or none with alpha > 1) we return NaN and say why.
    """
    x = as_eigenvalues(eigs)
    x = x[x > 0]
    n = x.size
    if n < MIN_EVALS:
        return TailFit.failed(f"alpha_peak: {n} positive eigenvalues (< {MIN_EVALS})")
    log10_x = np.log10(x)
    lo, hi = float(log10_x.min()), float(log10_x.max())
    if hi <= lo:
        return TailFit.failed("alpha_peak: all eigenvalues are equal")
    xmin2 = 10 ** np.linspace(lo, hi, bins + 1)[int(np.argmax(_histc(log10_x, bins, lo, hi)))]
    window_low = math.log10(0.95 * xmin2)  # reference quirk: log10 units, compared with raw eigenvalues
    window_high = 1.5 * xmin2 if xmin_max is None else xmin_max
    candidates = x[:-1]
    starts = np.nonzero((candidates >= window_low) & (candidates <= window_high))[0]
    if starts.size == 0:
        return TailFit.failed("alpha_peak: no eigenvalue inside the peak window")
    alphas = hill_alphas(np.log(x), starts)
    best, D = ks_best(x, starts, alphas)
    if not _usable(alphas[best : best + 1])[0]:
        return TailFit.failed("alpha_peak: no candidate xmin gives alpha > 1")
    i = int(starts[best])
    return TailFit(alpha=float(alphas[best]), xmin=float(x[i]), D=D, num_pl_spikes=n - i)


def _histc(values: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """torch.histc's counts: equal bins over [lo, hi], the top edge in the last bin."""
    index = np.minimum(((values - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
    return np.bincount(index, minlength=bins)


def alpha_ww(eigs) -> TailFit:
    """WeightWatcher 0.7.x default power-law fit (its ``WWFit``).

    Eigenvalues <= 1e-5 are dropped; every remaining eigenvalue but the largest is a
    candidate xmin; alpha is the continuous MLE of the tail and the candidate with the
    smallest KS distance D wins (first one on ties).  sigma = (alpha - 1) / sqrt(n_tail).
    With fewer than 20 eigenvalues WeightWatcher uses a small-N variant (bias-corrected
    alpha, tails of at least 8, objective D - 0.868/sqrt(n_tail)); so do we.
    """
    all_eigs = as_eigenvalues(eigs)
    x = all_eigs[all_eigs > WW_EVALS_THRESH]
    n = x.size
    if n < MIN_EVALS:
        return TailFit.failed(f"alpha: {n} eigenvalues above {WW_EVALS_THRESH} (< {MIN_EVALS})")
    if n < WW_SMALL_N:
        return _alpha_ww_small_n(x, all_eigs)
    starts = np.arange(n - 1)
    alphas = hill_alphas(np.log(x), starts)
    best, D = ks_best(x, starts, alphas)
    return _ww_result(x, all_eigs, best, float(alphas[best]), D)


def _alpha_ww_small_n(x: np.ndarray, eigs: np.ndarray) -> TailFit:
    n = x.size
    starts = np.arange(n - 1)
    tail = n - starts
    alphas = hill_alphas(np.log(x), starts, bias_corrected=True)
    spread = (alphas - 1) * (tail - 1)  # > 1e-12 exactly when the reference's s > 1e-12
    usable = (tail >= WW_SMALL_N_MIN_TAIL) & (spread > 1e-12) & _usable(alphas)
    ds = ks_distances(x, starts, np.where(usable, alphas, 0.0))
    objective = np.where(usable, ds - WW_SMALL_N_KS_OFFSET / np.sqrt(tail), np.inf)
    if not np.isfinite(objective).any():
        return TailFit.failed("alpha: no usable tail for the small-N fit")
    best = int(np.argmin(objective))
    return _ww_result(x, eigs, best, float(alphas[best]), float(ds[best]))


def _ww_result(x: np.ndarray, eigs: np.ndarray, best: int, alpha: float, D: float) -> TailFit:
    xmin = float(x[best])
    return TailFit(
        alpha=alpha,
        xmin=xmin,
        D=D,
        sigma=(alpha - 1) / math.sqrt(x.size - best),
        num_pl_spikes=int((eigs >= xmin).sum()),
    )


@dataclass(frozen=True)
class KSScan:
    """Every candidate of WeightWatcher's scan: xmin, its alpha and its KS distance (for plots)."""

    xmins: np.ndarray
    alphas: np.ndarray
    Ds: np.ndarray


def ks_scan(eigs) -> KSScan:
    """The full D-vs-xmin and alpha-vs-xmin curves of the ``alpha`` fit (standard, n >= 20)."""
    x = as_eigenvalues(eigs)
    x = x[x > WW_EVALS_THRESH]
    if x.size < MIN_EVALS:
        empty = np.zeros(0)
        return KSScan(empty, empty, empty)
    starts = np.arange(x.size - 1)
    alphas = hill_alphas(np.log(x), starts)
    return KSScan(x[:-1], alphas, ks_distances(x, starts, alphas))


ESTIMATORS = {"alpha": alpha_ww, "alpha_hill": alpha_hill, "alpha_peak": alpha_peak}
