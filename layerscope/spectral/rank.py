"""Rank diagnostics (the ``rank`` estimator) and WeightWatcher's per-row verdict and model means.

``rank`` needs the singular values themselves: near zero, a Gram eigenvalue carries an absolute error of about
ε·λ_max, so σ = √λ cannot resolve singular values below about √ε·σ_max, and a rank count from the Gram
spectrum would call a rank-deficient matrix full.  So the estimator runs an SVD (float64), as WeightWatcher
does, and defines, with N the larger side and σ the singular values:

* ``matrix_rank``: the number of σ > σ_max · N · ε(float64) (``np.linalg.matrix_rank``'s tolerance);
* ``rank_loss``: min(N, M) − matrix_rank;
* ``weak_rank_loss``: the number of eigenvalues σ² below ``tolerance`` (WeightWatcher's default 1e-6, raw units);
* ``sv_max``, ``sv_min``: the largest and smallest singular value.

``warning`` (with ``alpha``): ``over-trained`` below α = 2, ``under-trained`` above α = 6, empty between, as
WeightWatcher's thresholds say; a failed fit gets no verdict (WeightWatcher's −1 would read "over-trained").
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

WEAK_RANK_TOLERANCE = 1e-6
OVER_TRAINED_BELOW = 2.0
UNDER_TRAINED_ABOVE = 6.0
SUMMARY_METRICS = ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank",
                   "mp_softrank")  # WeightWatcher's get_summary(), in its order


def rank_diagnostics(weight: torch.Tensor, tolerance: float = WEAK_RANK_TOLERANCE) -> dict:
    """The ``rank`` estimator's columns for one 2-D weight (see the module docstring).  A convolution kernel's
    matrices ``(rf, out, in)`` count together: ranks and losses summed over them, sv_max and sv_min over all."""
    sv = torch.linalg.svdvals(weight.detach().to(torch.float64)).cpu().numpy()
    sv = sv.reshape(-1, sv.shape[-1])
    n_rows = max(weight.shape[-2:])
    largest = sv.max(axis=1, initial=0.0)
    rank = int(np.count_nonzero(sv > (largest * n_rows * np.finfo(np.float64).eps)[:, None]))
    return {"matrix_rank": rank, "rank_loss": sv.size - rank, "weak_rank_loss": int(np.count_nonzero(sv * sv < tolerance)),
            "sv_max": float(sv.max()) if sv.size else 0.0, "sv_min": float(sv.min()) if sv.size else math.nan}


def warning(alpha: float) -> str | None:
    if not math.isfinite(alpha):
        return None
    if alpha < OVER_TRAINED_BELOW:
        return "over-trained"
    return "under-trained" if alpha > UNDER_TRAINED_ABOVE else ""


def summary(table: pd.DataFrame) -> dict[str, float]:
    """WeightWatcher's ``get_summary()``: the mean of each of its model metrics the table holds, over the rows
    whose fit succeeded (layerscope's failed fits are NaN and left out; WeightWatcher averages its −1 in)."""
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    return {metric: float(ok[metric].mean()) for metric in SUMMARY_METRICS if metric in ok.columns}
