"""Estimators that need the matrix, not only its eigenvalues: FARMS, the Marchenko–Pastur fit and the
randomized ESD — each as its authors define it.

``alpha_farms`` (FARMS, arXiv 2506.06280).  Take windows of m = min(2000, rows, cols) rows and
⌊Q·m⌋ columns (Q = 1) from the weight as stored; along each dimension the step is
max(1, ⌊(size − window) / (k − 1)⌋) for k = 15 windows, the number of windows
min(k, max(1, (size − window) // step + 1)), and window i starts at min(i·step, size − window).
The squared singular values of every window are pooled into one ESD, and α is AlphaLoRA's
``alpha_peak`` fit of that ESD.  (Windows' eigenvalues are computed as Gram eigenvalues in float64.)

``mp`` (WeightWatcher's ``mp_fit``, rescale on).  The ESD is scaled so that it sums to its length;
σ is the minimiser over σ ∈ [0.05 s, 2 s) in steps of 0.01 s (s = √(λ_max / (1 + 1/√Q)²), Q = N/M),
polished with Nelder–Mead (``scipy.optimize.brute``), of the squared residual between the
Marchenko–Pastur density (the quarter-circle law of the singular values when Q = 1) and a
linear-kernel density estimate (bandwidth 0.1) of the ESD on 1000 points of [0, λ_max + 0.5],
where the estimate exceeds 0.01; a fit whose bulk edge lies left of the density's peak or past the
grid scores 1000 per point.  Bulk edge λ₊ = (σ(1 + 1/√Q))²; ``num_spikes`` counts eigenvalues above
λ₊ + √(λ₊^(2/3) / (√Q · M^(2/3))) (a Tracy–Widom margin); ``mp_softrank`` = λ₊ / λ_max.  ``sigma_mp`` is
in the rescaled units; ``bulk_max`` and ``bulk_min`` ((σ(1 ∓ 1/√Q))²) are returned in raw eigenvalue units, as
WeightWatcher returns them, and ``W_scale`` is the rescaling factor √(len / Σλ).

``rand`` (WeightWatcher's randomized ESD).  The weight's entries are shuffled (a seeded permutation
per matrix) and its ESD recomputed: ``rand_distance`` is the Jensen–Shannon distance between the
sorted ESD and the sorted randomized ESD, each taken as a discrete distribution; ``num_rand_spikes``
is ``num_spikes`` of the MP fit to the randomized ESD, pooled over 5 shuffles when M < 100;
``max_rand_eval`` its largest eigenvalue.  Spikes that survive shuffling are not correlations the
layer learned but large individual entries ("correlation traps").
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import torch

from layerscope.spectral import esd

FARMS_ROWS = 2000
FARMS_Q = 1.0
FARMS_WINDOWS = 15
KDE_BANDWIDTH = 0.1
KDE_POINTS = 1000
KDE_THRESHOLD = 0.01
WINDOW_BATCH_BYTES = 64 << 20


# ---- FARMS -------------------------------------------------------------------------------------

def farms_windows(rows: int, cols: int, m_max: int = FARMS_ROWS, q: float = FARMS_Q,
                  windows: int = FARMS_WINDOWS) -> tuple[int, int, list[int], list[int]]:
    """(window rows, window cols, row starts, column starts) of FARMS's sliding windows."""
    m = min(m_max, rows, cols)
    n = int(m * q)
    if n > cols:  # Q > 1 on a matrix too narrow for it: shrink the window, keep the aspect ratio
        m = max(1, int(cols / q))
        n = int(m * q)
    if m < 1 or n < 1:
        return m, n, [], []

    def starts(size: int, window: int) -> list[int]:
        step = max(1, math.floor((size - window) / (windows - 1))) if windows > 1 else 1
        count = min(windows, max(1, (size - window) // step + 1))
        return [min(i * step, size - window) for i in range(count)]

    return m, n, starts(rows, m), starts(cols, n)


def farms_eigenvalues(weight: torch.Tensor, m_max: int = FARMS_ROWS, q: float = FARMS_Q,
                      windows: int = FARMS_WINDOWS) -> np.ndarray:
    """The pooled, sorted ESD of FARMS's windows of ``weight`` (2-D, as stored), in float64."""
    rows, cols = weight.shape
    m, n, row_starts, col_starts = farms_windows(rows, cols, m_max, q, windows)
    corners = [(i, j) for i in row_starts for j in col_starts]
    per_batch = max(1, WINDOW_BATCH_BYTES // (m * n * 8 + 2 * min(m, n) ** 2 * 8))
    pooled = []
    for start in range(0, len(corners), per_batch):
        chunk = torch.stack([weight[i:i + m, j:j + n] for i, j in corners[start:start + per_batch]])
        eigs, _ = esd.gram_eigenvalues(chunk, torch.float64)
        pooled.append(eigs.reshape(-1))
    return np.sort(torch.cat(pooled).numpy()) if pooled else np.empty(0)


# ---- Marchenko–Pastur fit (WeightWatcher's mp_fit) --------------------------------------------

def _linear_kde(samples: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Density estimate with the normalised linear kernel (1/(n·h))·Σ max(0, 1 − |x − xᵢ| / h)."""
    density = np.zeros_like(grid)
    for start in range(0, len(samples), 4096):
        block = samples[start:start + 4096]
        density += np.maximum(0.0, 1.0 - np.abs(grid[:, None] - block[None, :]) / bandwidth).sum(axis=1)
    return density / (len(samples) * bandwidth)


def _mp_density(x: np.ndarray, q: float, sigma: float) -> tuple[np.ndarray, float, float]:
    b = (sigma * (1 + math.sqrt(1 / q))) ** 2
    a = (sigma * (1 - math.sqrt(1 / q))) ** 2
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nan_to_num((1 / (2 * np.pi * sigma * sigma * x * (1 / q))) * np.sqrt((b - x) * (x - a)))
    return values, a, b


def _quarter_circle(x: np.ndarray, sigma: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - x ** 2))


class _Residual:
    """Σ (fitted density − KDE)² over the KDE's support; the KDE does not depend on σ, so it is made once."""

    def __init__(self, to_fit: np.ndarray, q: float):
        grid = np.linspace(0, np.max(to_fit) + 0.5, KDE_POINTS)
        density = _linear_kde(to_fit, grid, KDE_BANDWIDTH)
        self.dropped = int((density < KDE_THRESHOLD).sum())
        keep = density > KDE_THRESHOLD
        self.x, self.y, self.q = grid[keep], density[keep], q
        self.peak = self.x[np.argmax(self.y)] if len(self.y) else 0.0

    def __call__(self, sigma) -> float:
        sigma = float(np.asarray(sigma).reshape(-1)[0])
        if self.q == 1:
            resid = _quarter_circle(self.x, sigma) - self.y
        else:
            values, a, b = _mp_density(self.x, self.q, sigma)
            if b < self.peak or b > np.max(self.x) or a > self.peak:
                resid = np.full(len(self.y), 1000.0)
            else:
                resid = values - self.y
        return float(np.sum(resid ** 2))  # the dropped points contribute zeros


def mp_fit(eigs: np.ndarray, n_rows: int, m_cols: int) -> dict[str, float]:
    """num_spikes, sigma_mp (rescaled units), mp_softrank, bulk_max and bulk_min (raw eigenvalue units, as
    WeightWatcher returns them) and W_scale (the rescaling factor) of an ESD, as WeightWatcher fits it."""
    eigs = np.asarray(eigs, dtype=np.float64)
    q = n_rows / m_cols
    scale = math.sqrt(len(eigs)) / math.sqrt(float(np.sum(eigs)))
    scaled = scale * scale * eigs
    lambda_max = float(np.max(scaled))
    s = math.sqrt(lambda_max / (1 + 1 / math.sqrt(q)) ** 2)
    to_fit = np.sqrt(scaled) if q == 1 else scaled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        from scipy import optimize  # 0.8 s to import: only where an MP fit runs

        best = optimize.brute(_Residual(to_fit, q), (slice(0.05 * s, 2.0 * s, 0.01 * s),), full_output=True)
    sigma = float(np.asarray(best[0]).reshape(-1)[0])
    bulk_max = (sigma * (1 + 1 / math.sqrt(q))) ** 2
    tracy_widom = 1 / math.sqrt(q) * bulk_max ** (2 / 3) * m_cols ** (-2 / 3)
    spikes = int(np.sum(scaled > bulk_max + math.sqrt(tracy_widom)))
    bulk_min = (sigma * (1 - 1 / math.sqrt(q))) ** 2
    return {"num_spikes": spikes, "sigma_mp": sigma, "mp_softrank": bulk_max / lambda_max,
            "bulk_max": bulk_max / (scale * scale), "bulk_min": bulk_min / (scale * scale), "W_scale": scale}


# ---- randomized ESD ----------------------------------------------------------------------------

def shuffled_eigenvalues(weight: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    flat = weight.reshape(-1)
    shuffled = flat[torch.from_numpy(rng.permutation(flat.numel()))].reshape(weight.shape)
    eigs, _ = esd.gram_eigenvalues(shuffled[None], torch.float64)
    return eigs[0].numpy()


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    middle = (p + q) / 2
    from scipy import stats

    return float(math.sqrt((stats.entropy(p, middle) + stats.entropy(q, middle)) / 2))


def randomized_esd(weight: torch.Tensor, eigs: np.ndarray, name: str, seed: int = 0) -> dict[str, float]:
    """rand_distance, num_rand_spikes, max_rand_eval, rand_mp_softrank (the MP fit of the pooled shuffles) and
    ww_softrank (the largest shuffled eigenvalue over the largest eigenvalue) of one matrix (``eigs``: its sorted
    ESD)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8", "surrogatepass"))])
    n_rows, m_cols = max(weight.shape), min(weight.shape)
    replicas = 5 if m_cols < 100 else 1
    pooled = np.concatenate([shuffled_eigenvalues(weight, rng) for _ in range(replicas)])
    single = shuffled_eigenvalues(weight, rng)
    fit = mp_fit(pooled, n_rows, m_cols)
    return {"rand_distance": jensen_shannon_distance(np.asarray(eigs, dtype=np.float64), single),
            "num_rand_spikes": fit["num_spikes"], "max_rand_eval": float(np.max(pooled)),
            "rand_mp_softrank": fit["mp_softrank"], "ww_softrank": float(np.max(single) / np.max(eigs))}
