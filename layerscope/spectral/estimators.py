"""Power-law tail estimators of an empirical spectral density.

Three different "alphas" are in use and they are NOT interchangeable:

* ``alpha_hill``  TempBalance ``xmin_mid``: Hill estimator with xmin at the median eigenvalue.
* ``alpha_peak``  AlphaLoRA ``fix_finger`` / TempBalance ``xmin_peak``: KS scan restricted to
                  a window around the peak of the log-histogram.
* ``alpha``       WeightWatcher 0.7.x default (``pl_package='ww'``): KS scan over every
                  eigenvalue but the largest, after dropping eigenvalues <= 1e-5.

All take eigenvalues sorted ascending as a float64 torch tensor (any device).  The KS
scans are vectorised: candidate xmins are processed as blocks of rows of a matrix, never
one Python iteration per candidate; for ``alpha`` a branch-and-bound over cheap lower bounds
skips the candidates that provably cannot have the smallest D (same result, a fraction of
the work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WW_EVALS_THRESH = 1e-5  # WeightWatcher drops eigenvalues at or below this before fitting
WW_SMALL_N = 20  # below this many eigenvalues WeightWatcher switches to its small-N fit
WW_SMALL_N_MIN_TAIL = 8
WW_SMALL_N_KS_OFFSET = 0.868
MIN_EVALS = 8  # fewer eigenvalues than this: no estimator is meaningful
PEAK_BINS = 100
_BLOCK_ELEMENTS = 1 << 20  # 8 MiB of float64 per KS block temporary


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


def _log_spreads(log_x: torch.Tensor) -> torch.Tensor:
    """sum_{j>=i} (ln x_j - ln x_i) for every i, without cancellation.

    Written as sum_{m>i} (n - m) * (ln x_m - ln x_{m-1}): every term is >= 0, so near-equal
    eigenvalues do not turn the difference of two large sums into rounding noise.
    """
    n = log_x.numel()
    steps = torch.diff(log_x) * torch.arange(n - 1, 0, -1, dtype=log_x.dtype, device=log_x.device)
    tail = torch.flip(torch.cumsum(torch.flip(steps, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def hill_alphas(log_x: torch.Tensor, starts: torch.Tensor, bias_corrected: bool = False) -> torch.Tensor:
    """alpha_i = 1 + k / (sum_{j>=i} ln x_j - k ln x_i), k = n - i (or k-1 on top, bias corrected)."""
    n = log_x.numel()
    k = (n - starts).to(log_x.dtype)
    spread = _log_spreads(log_x)[starts]
    numerator = k - 1 if bias_corrected else k
    return 1 + numerator / spread


def ks_distances(x: torch.Tensor, starts: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """D_i = max_{j>=i} |1 - (x_j/x_i)^(1-alpha_i) - (j-i)/(n-i)| for each start i.

    Rows whose alpha is not a finite number > 1 get D = 1, as in the references.
    """
    n = x.numel()
    log_x = torch.log(x)
    out = torch.ones(starts.numel(), dtype=x.dtype, device=x.device)
    valid = torch.isfinite(alphas) & (alphas > 1)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for first in range(0, starts.numel(), rows_per_block):
        rows = slice(first, first + rows_per_block)
        s, a = starts[rows], alphas[rows]
        cols = torch.arange(int(s.min()), n, device=x.device)
        # theoretical CDF 1 - (x_j/x_i)^(1-alpha_i), built in place to keep one block in memory
        gap = log_x[cols][None, :] - log_x[s][:, None]
        gap.mul_((1 - a)[:, None]).exp_().neg_().add_(1)
        empirical = (cols[None, :] - s[:, None]).to(x.dtype).div_((n - s).to(x.dtype)[:, None])
        gap.sub_(empirical).abs_()
        del empirical
        gap.masked_fill_(cols[None, :] < s[:, None], 0)  # only j >= i belongs to the tail
        out[rows] = torch.where(valid[rows], gap.amax(dim=1), out[rows])
    return out


def ks_lower_bounds(x: torch.Tensor, alphas: torch.Tensor, samples: int = 64, head: int = 16) -> torch.Tensor:
    """A lower bound of D_i for every candidate i = 0..n-2: the same maximum over a subset of the tail.

    The subset is the first ``head`` points of each tail (where fits usually deviate most; read
    as shifted slices) and ``samples`` fixed positions spread over the whole spectrum (those at or
    after i).  No per-candidate gathers, so this costs a few dense (n × 80) operations.
    Invalid rows get exactly 1, which is their D.
    """
    n = x.numel()
    log_x = torch.log(x)
    i = torch.arange(n - 1, device=x.device)
    tail = (n - i).to(x.dtype)
    slope = 1 - alphas
    base = log_x[:-1]
    padded = torch.cat([log_x, log_x[-1:].expand(head)])
    bound = torch.zeros(n - 1, dtype=x.dtype, device=x.device)
    for k in range(head):  # j = i + k (clipped to the last eigenvalue)
        offset = torch.clamp(n - 1 - i, max=k).to(x.dtype)
        value = torch.abs(1 - torch.exp(slope * (padded[k:k + n - 1] - base)) - offset / tail)
        bound = torch.maximum(bound, value)
    grid = torch.unique(torch.linspace(0, n - 1, samples, device=x.device).round().long())
    offsets = grid[None, :] - i[:, None]
    values = torch.abs(1 - torch.exp(slope[:, None] * (log_x[grid][None, :] - base[:, None]))
                       - offsets.to(x.dtype) / tail[:, None])
    values.masked_fill_(offsets < 0, 0)
    bound = torch.maximum(bound, values.amax(dim=1))
    valid = torch.isfinite(alphas) & (alphas > 1)
    return torch.where(valid, bound, torch.ones_like(bound))


def ks_best(x: torch.Tensor, alphas: torch.Tensor, block: int = 32) -> tuple[int, float]:
    """(candidate i, D) of the smallest KS distance over i = 0..n-2, first on ties — as the full scan.

    Branch and bound: candidates are visited in order of a cheap lower bound of their D and
    computed exactly in blocks; once the next lower bound exceeds the best exact D found, no
    remaining candidate can win or tie, so the rest are never computed.
    """
    starts = torch.arange(x.numel() - 1, device=x.device)
    bounds = ks_lower_bounds(x, alphas)
    order = torch.argsort(bounds, stable=True)
    best_pos, best_d = -1, math.inf
    for first in range(0, order.numel(), block):
        chunk = order[first:first + block]
        if float(bounds[chunk[0]]) > best_d:
            break
        ds = ks_distances(x, starts[chunk], alphas[chunk])
        for pos, d in zip(chunk.tolist(), ds.tolist()):
            if d < best_d or (d == best_d and pos < best_pos):
                best_pos, best_d = pos, d
    return best_pos, best_d


def alpha_hill(eigs: torch.Tensor) -> TailFit:
    """TempBalance ``xmin_mid``: i = int(n/2), xmin = eigs[i], Hill estimate of the top half.

    Non-positive eigenvalues are dropped first (the reference takes log(0) = -inf there).
    """
    x = eigs[eigs > 0]
    n = x.numel()
    if n < MIN_EVALS:
        return TailFit.failed(f"alpha_hill: {n} positive eigenvalues (< {MIN_EVALS})")
    i = n // 2
    log_x = torch.log(x)
    start = torch.tensor([i], device=x.device)
    alpha = float(hill_alphas(log_x, start)[0])
    D = float(ks_distances(x, start, torch.tensor([alpha], dtype=x.dtype, device=x.device))[0])
    return TailFit(alpha=alpha, xmin=float(x[i]), D=D, num_pl_spikes=n - i)


def alpha_peak(eigs: torch.Tensor, bins: int = PEAK_BINS) -> TailFit:
    """AlphaLoRA ``fix_finger`` (TempBalance ``xmin_peak``).

    xmin2 = 10 ** (left edge of the fullest of ``bins`` log10-histogram bins); candidate
    xmins are the eigenvalues (all but the largest) in [log10(0.95*xmin2), 1.5*xmin2].
    The lower bound is a log10 value compared with raw eigenvalues: that is what the
    reference code does, so it is reproduced here (it makes the lower bound vacuous
    whenever xmin2 < ~1.05).  Among the candidates the alpha with the smallest KS
    distance wins.  Where the reference would return a placeholder (no candidate in the
    window, or none with alpha > 1) we return NaN and say why.
    """
    x = eigs[eigs > 0]
    n = x.numel()
    if n < MIN_EVALS:
        return TailFit.failed(f"alpha_peak: {n} positive eigenvalues (< {MIN_EVALS})")
    log10_x = torch.log10(x)
    lo, hi = log10_x.min(), log10_x.max()
    if hi <= lo:
        return TailFit.failed("alpha_peak: all eigenvalues are equal")
    counts = torch.histc(log10_x, bins=bins, min=float(lo), max=float(hi))
    edges = torch.linspace(float(lo), float(hi), bins + 1, dtype=x.dtype, device=x.device)
    xmin2 = 10 ** edges[int(torch.argmax(counts))]
    window_low = torch.log10(0.95 * xmin2)  # reference quirk: log10 units, compared with raw eigenvalues
    window_high = 1.5 * xmin2
    candidates = x[:-1]
    starts = torch.nonzero((candidates >= window_low) & (candidates <= window_high)).flatten()
    if starts.numel() == 0:
        return TailFit.failed("alpha_peak: no eigenvalue inside the peak window")
    alphas = hill_alphas(torch.log(x), starts)
    ds = ks_distances(x, starts, alphas)
    best = int(torch.argmin(ds))
    if not (torch.isfinite(alphas[best]) and alphas[best] > 1):
        return TailFit.failed("alpha_peak: no candidate xmin gives alpha > 1")
    i = int(starts[best])
    return TailFit(alpha=float(alphas[best]), xmin=float(x[i]), D=float(ds[best]), num_pl_spikes=n - i)


def alpha_ww(eigs: torch.Tensor) -> TailFit:
    """WeightWatcher 0.7.x default power-law fit (its ``WWFit``), vectorised.

    Eigenvalues <= 1e-5 are dropped; every remaining eigenvalue but the largest is a
    candidate xmin; alpha is the continuous MLE of the tail and the candidate with the
    smallest KS distance D wins (first one on ties).  sigma = (alpha - 1) / sqrt(n_tail).
    With fewer than 20 eigenvalues WeightWatcher uses a small-N variant (bias-corrected
    alpha, tails of at least 8, objective D - 0.868/sqrt(n_tail)); so do we.
    """
    x = eigs[eigs > WW_EVALS_THRESH]
    n = x.numel()
    if n < MIN_EVALS:
        return TailFit.failed(f"alpha: {n} eigenvalues above {WW_EVALS_THRESH} (< {MIN_EVALS})")
    if n < WW_SMALL_N:
        return _alpha_ww_small_n(x, eigs)
    starts = torch.arange(n - 1, device=x.device)
    alphas = hill_alphas(torch.log(x), starts)
    best, D = ks_best(x, alphas)
    return _ww_result(x, eigs, best, float(alphas[best]), D)


def _alpha_ww_small_n(x: torch.Tensor, eigs: torch.Tensor) -> TailFit:
    n = x.numel()
    starts = torch.arange(n - 1, device=x.device)
    tail = n - starts
    alphas = hill_alphas(torch.log(x), starts, bias_corrected=True)
    spread = (alphas - 1) * (tail - 1)  # > 1e-12 exactly when the reference's s > 1e-12
    usable = (tail >= WW_SMALL_N_MIN_TAIL) & (spread > 1e-12) & (alphas > 1)
    ds = ks_distances(x, starts, torch.where(usable, alphas, torch.zeros_like(alphas)))
    objective = torch.where(usable, ds - WW_SMALL_N_KS_OFFSET / torch.sqrt(tail.to(x.dtype)), math.inf)
    if not torch.isfinite(objective).any():
        return TailFit.failed("alpha: no usable tail for the small-N fit")
    best = int(torch.argmin(objective))
    return _ww_result(x, eigs, best, float(alphas[best]), float(ds[best]))


def _ww_result(x: torch.Tensor, eigs: torch.Tensor, best: int, alpha: float, D: float) -> TailFit:
    xmin = float(x[best])
    return TailFit(
        alpha=alpha,
        xmin=xmin,
        D=D,
        sigma=(alpha - 1) / math.sqrt(x.numel() - best),
        num_pl_spikes=int((eigs >= xmin).sum()),
    )


@dataclass(frozen=True)
class KSScan:
    """Every candidate of WeightWatcher's scan: xmin, its alpha and its KS distance (for plots)."""

    xmins: torch.Tensor
    alphas: torch.Tensor
    Ds: torch.Tensor


def ks_scan(eigs: torch.Tensor) -> KSScan:
    """The full D-vs-xmin and alpha-vs-xmin curves of the ``alpha`` fit (standard, n >= 20)."""
    x = eigs[eigs > WW_EVALS_THRESH]
    if x.numel() < MIN_EVALS:
        empty = x.new_zeros(0)
        return KSScan(empty, empty, empty)
    starts = torch.arange(x.numel() - 1, device=x.device)
    alphas = hill_alphas(torch.log(x), starts)
    return KSScan(x[:-1], alphas, ks_distances(x, starts, alphas))


ESTIMATORS = {"alpha": alpha_ww, "alpha_hill": alpha_hill, "alpha_peak": alpha_peak}
