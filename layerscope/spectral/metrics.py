"""Norm-based spectral metrics, named and defined as WeightWatcher defines them.

``eigs`` are all M eigenvalues of the Gram matrix (float64, ascending, clamped at 0), as a
NumPy array or a torch tensor.
"""

from __future__ import annotations

import math

import numpy as np

from layerscope.spectral.estimators import as_eigenvalues

_WW_ENTROPY_EPS = 1e-10  # WeightWatcher adds this to p and to the rank


def norm_metrics(eigs, n_rows: int, alpha: float) -> dict[str, float]:
    """lambda_max, log_norm, log_spectral_norm, alpha_weighted, log_alpha_norm, stable_rank, entropy."""
    eigs = as_eigenvalues(eigs)
    lambda_max = float(eigs[-1])
    frobenius_sq = float(eigs.sum())
    log_spectral_norm = math.log10(lambda_max)
    if math.isfinite(alpha):
        alpha_weighted = alpha * log_spectral_norm
        log_alpha_norm = _log10_sum_of_powers(eigs, alpha)
    else:
        alpha_weighted = log_alpha_norm = math.nan
    return {
        "lambda_max": lambda_max,
        "log_norm": math.log10(frobenius_sq),
        "log_spectral_norm": log_spectral_norm,
        "alpha_weighted": alpha_weighted,
        "log_alpha_norm": log_alpha_norm,
        "stable_rank": frobenius_sq / lambda_max,
        "entropy": matrix_entropy(eigs, n_rows),
    }


def _log10_sum_of_powers(eigs: np.ndarray, alpha: float) -> float:
    """log10 Σ λ^α without overflow (α can reach 60 for badly fitting tails): a log-sum-exp."""
    positive = eigs[eigs > 0]
    if not len(positive):
        return -math.inf
    logs = alpha * np.log(positive)
    top = float(logs.max())
    return (top + math.log(float(np.exp(logs - top).sum()))) / math.log(10)


def matrix_entropy(eigs, n_rows: int) -> float:
    """Spectral entropy normalised by log(rank), exactly as WeightWatcher's ``matrix_entropy``."""
    eigs = as_eigenvalues(eigs)
    sv = np.sqrt(eigs)
    tol = float(sv.max()) * n_rows * np.finfo(np.float64).eps
    rank = int((sv > tol).sum()) + _WW_ENTROPY_EPS
    p = eigs / eigs.sum() + _WW_ENTROPY_EPS
    return float(-(p * np.log(p)).sum() / math.log(rank))
