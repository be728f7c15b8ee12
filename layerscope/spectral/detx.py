"""WeightWatcher's detX constraint (the ``detx`` estimator): where the tail's determinant crosses 1.

Rescale the Gram eigenvalues λ₁ ≤ … ≤ λ_M to mean 1 (λ·M/Σλ, WeightWatcher's ``rescale_eigenvalues``).  Going
down from the largest, the tail {λ_i … λ_M} is the first whose product falls below 1:

* ``detX_num`` = M − i + 1, the tail's size (M when no tail's product falls below 1, as WeightWatcher returns);
* ``detX_val``: the eigenvalue λ_i where that happens (λ₂ when none does, as WeightWatcher's loop leaves it), in
  raw units; ``detX_val_unrescaled`` the same eigenvalue
  in the rescaled units (WeightWatcher's names, kept);
* ``num_ERG_spikes``: detX_num again (the exact renormalization group's name for it);
* ``ERG_gap`` = detX_num − num_pl_spikes, the tail the constraint sees against the one the power-law fit sees
  (with the ``alpha`` estimator; NaN without it).

The products run in float64 over the rescaled eigenvalues, as WeightWatcher's ``np.prod`` does, so an overflow to
infinity ends the same way (no tail below 1).
"""

from __future__ import annotations

import math

import numpy as np

DETX_COLUMNS = ["detX_num", "detX_val", "detX_val_unrescaled", "num_ERG_spikes", "ERG_gap"]


def detx_constraint(eigs: np.ndarray, num_pl_spikes: float | None = None) -> dict:
    """The ``detx`` columns of one matrix's ascending Gram eigenvalues (see the module docstring)."""
    eigs = np.asarray(eigs, dtype=np.float64)
    count = len(eigs)
    total = float(eigs.sum())
    if count < 2 or not total > 0 or not eigs[0] < eigs[-1]:
        return dict.fromkeys(DETX_COLUMNS, math.nan)
    scale = count / total
    rescaled = eigs * scale
    with np.errstate(over="ignore", under="ignore"):
        tails = np.cumprod(rescaled[::-1])[::-1]  # tails[i] = Π rescaled[i:]
    below = np.flatnonzero(tails[1:] < 1.0)  # WeightWatcher stops at index 1: the whole spectrum is never tested
    index = int(below[-1]) + 1 if len(below) else 1  # none: WeightWatcher's loop ends at index 1 ...
    number = count - index if len(below) else count  # ... and counts the whole spectrum
    return {"detX_num": number, "detX_val": float(rescaled[index] / scale), "detX_val_unrescaled": float(rescaled[index]),
            "num_ERG_spikes": number,
            "ERG_gap": number - num_pl_spikes if num_pl_spikes is not None and math.isfinite(num_pl_spikes) else math.nan}
