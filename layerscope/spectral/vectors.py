"""Eigenvector localization (the ``vectors`` estimator), as WeightWatcher's ``vectors=True`` defines it.

The eigenvectors v of the smaller Gram matrix (WᵀW or WWᵀ, float64) are split at the power-law fit's ``xmin``
(the ``alpha`` estimator's, clipped when ``--fix-fingers`` is on): the tail is the ``num_pl_spikes`` eigenvectors
of the largest eigenvalues (λ ≥ xmin), the bulk the rest.
For each eigenvector:

* ``vec_entropy``: the discrete entropy of |v| − mean |v| over a 100-bin density histogram, each bin's density
  plus 1e-10, divided by √(2π) and normalised to sum to 1: −Σ p ln p;
* ``loc_ratio``: the localization ratio ‖v‖₁ / ‖v‖∞;
* ``part_ratio``: the participation ratio ‖v‖₂ / ‖v‖₄.

Columns: ``bulk_mean_*``, ``bulk_var_*``, ``tail_mean_*``, ``tail_var_*`` of each (population variance; NaN for
an empty side).  WeightWatcher takes the eigenvectors from a general eigensolver (``scipy.linalg.eig``);
these come from the symmetric one, equal up to sign, which none of the three metrics sees.  xmin is itself an
eigenvalue, and WeightWatcher compares the general solver's recomputed eigenvalues with it, so rounding can put
the xmin eigenvector in its bulk (23 of the 39 MiniLM matrices); counting the tail as the fit does avoids that.
"""

from __future__ import annotations

import math

import numpy as np
import torch

VECTOR_METRICS = ("vec_entropy", "loc_ratio", "part_ratio")
VECTOR_COLUMNS = [f"{side}_{stat}_{metric}" for metric in VECTOR_METRICS for side in ("bulk", "tail")
                  for stat in ("mean", "var")]
BINS = 100
EPSILON = 1e-10


def discrete_entropy(vector: np.ndarray) -> float:
    magnitudes = np.abs(vector)
    density = np.histogram(magnitudes - magnitudes.mean(), bins=BINS, density=True)[0] + EPSILON
    p = density / math.sqrt(2 * math.pi)
    p = p / p.sum()
    return float(-np.sum(p * np.log(p)))


def localization(weight: torch.Tensor, tail_size: float) -> dict:
    """The ``vectors`` columns of one matrix whose power-law tail holds ``tail_size`` eigenvalues (the ``alpha``
    fit's ``num_pl_spikes``; see the module docstring)."""
    if not math.isfinite(tail_size):
        return dict.fromkeys(VECTOR_COLUMNS, math.nan)
    w = weight.detach().to(torch.float64).cpu().numpy()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues: the tail is the last tail_size columns
    metrics = {
        "vec_entropy": np.array([discrete_entropy(vectors[:, j]) for j in range(vectors.shape[1])]),
        "loc_ratio": np.abs(vectors).sum(axis=0) / np.abs(vectors).max(axis=0),
        "part_ratio": np.sqrt((vectors ** 2).sum(axis=0)) / ((vectors ** 4).sum(axis=0)) ** 0.25,
    }
    tail = np.arange(vectors.shape[1]) >= vectors.shape[1] - int(tail_size)
    out = {}
    for metric, values in metrics.items():
        for side, chosen in (("bulk", values[~tail]), ("tail", values[tail])):
            out[f"{side}_mean_{metric}"] = float(chosen.mean()) if len(chosen) else math.nan
            out[f"{side}_var_{metric}"] = float(chosen.var()) if len(chosen) else math.nan
    return out
