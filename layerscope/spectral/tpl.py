"""Truncated power laws (the ``tpl`` and ``e_tpl`` estimators), as WeightWatcher's ``fit='TPL'`` / ``'E_TPL'``
intend them, through the ``powerlaw`` package WeightWatcher uses.

The eigenvalues above 1e-5 go to ``powerlaw.Fit``; its ``truncated_power_law`` is the density
p(λ) ∝ λ^(−α) e^(−Λλ) for λ ≥ xmin, fitted by maximum likelihood:

* ``tpl``: xmin as ``powerlaw.Fit`` chooses it (the power law's smallest KS distance over every candidate);
  columns ``alpha_tpl``, ``Lambda``, ``xmin_tpl``.
* ``e_tpl`` (WeightWatcher's "extended" TPL, fitted in the ESD's peak window): xmin searched in
  (log10(0.95·xmin₂), 1.5·xmin₂), xmin₂ the left edge of the fullest of 100 log10 bins (the window's lower bound in
  log10 units, as WeightWatcher writes it; ``alpha_peak`` reproduces the same window); columns ``alpha_e_tpl``,
  ``Lambda_e_tpl``, ``xmin_e_tpl``.

WeightWatcher 0.7.7 passes ``powerlaw.Fit`` a ``distribution=`` argument that powerlaw 2.0 removed, so under 2.0
every TPL fit of its fails and reports −1; these columns are what its code asks powerlaw for.  Its ``alpha`` and
``Lambda`` columns hold the TPL's exponent and cutoff when ``fit='TPL'``; here the power law's ``alpha`` stays, and
the TPL's are apart.  The TPL's two parameters trade off against each other, so one eigenvalue more or less in the
tail can move ``alpha_tpl`` by tens of percent: read Λ with the tail's size.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

THRESHOLD = 1e-5  # WeightWatcher's EVALS_THRESH: eigenvalues at or below it are left out of the fit
TPL_COLUMNS = {"tpl": ["alpha_tpl", "Lambda", "xmin_tpl"], "e_tpl": ["alpha_e_tpl", "Lambda_e_tpl", "xmin_e_tpl"]}


def peak_window(eigs: np.ndarray) -> tuple[float, float]:
    """WeightWatcher's xmin search window around the ESD's peak (its lower bound in log10 units, as written)."""
    counts, edges = np.histogram(np.log10(eigs), bins=100)
    xmin2 = 10 ** edges[int(np.argmax(counts))]
    return float(np.log10(0.95 * xmin2)), float(1.5 * xmin2)


def truncated_power_law(eigs: np.ndarray, estimator: str) -> tuple[dict, str | None]:
    """(the ``tpl`` or ``e_tpl`` columns, a note when the fit failed) of ascending Gram eigenvalues."""
    import powerlaw

    columns = TPL_COLUMNS[estimator]
    kept = np.asarray(eigs, dtype=np.float64)
    kept = kept[kept > THRESHOLD]
    if len(kept) < 2:
        return dict.fromkeys(columns, math.nan), f"{estimator}: fewer than 2 eigenvalues above {THRESHOLD:g}"
    xmin = peak_window(kept) if estimator == "e_tpl" else None
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            fit = powerlaw.Fit(kept, xmin=xmin, verbose=False)
            tpl = fit.truncated_power_law
            values = (float(tpl.alpha), float(tpl.Lambda), float(fit.xmin))
    except Exception as exc:  # noqa: BLE001 - powerlaw raises ValueError, ZeroDivisionError ... on degenerate tails
        return dict.fromkeys(columns, math.nan), f"{estimator}: powerlaw's fit failed ({type(exc).__name__})"
    if not all(math.isfinite(v) for v in values):
        return dict.fromkeys(columns, math.nan), f"{estimator}: powerlaw's fit gave no finite parameters"
    return dict(zip(columns, values)), None
