"""WeightWatcher's ``fix_fingers='clip_xmax'``: a tail fit with its largest eigenvalues clipped off.

A few very large eigenvalues ("fingers", often finite-size effects) can drag the power-law fit to a
misleadingly large α.  WeightWatcher 0.7.7 (``RMT_Util.fit_clipped_powerlaw``) fits the whole ESD first (the
``raw_alpha``), then for k = 2, 3, … up to ``max_fingers`` − 1 refits without the k largest eigenvalues, and
takes the first fit whose α is more than ``finger_thresh`` below the raw α; ``num_fingers`` is then k − 1 (its
own count, although k eigenvalues were clipped).  It stops early, keeping the raw fit, when a refit's α falls
to 2 or below.  ``num_pl_spikes`` counts the whole ESD's eigenvalues at or above the chosen xmin.

Where layerscope differs on purpose: WeightWatcher replaces a ``max_fingers`` below half the ESD's length by its
default (10), so the option only takes effect on tiny matrices; layerscope uses the value given.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from layerscope.spectral.estimators import TailFit, alpha_ww, as_eigenvalues

FIX_FINGERS = ("clip_xmax",)
DEFAULT_MAX_FINGERS = 10
DEFAULT_FINGER_THRESH = 1.0
MIN_ALPHA = 2.0


def clipped_fit(eigs, max_fingers: int = DEFAULT_MAX_FINGERS,
                finger_thresh: float = DEFAULT_FINGER_THRESH) -> tuple[TailFit, TailFit, int]:
    """(the fit, the raw fit of the whole ESD, the number of fingers) as the module docstring describes."""
    ordered = np.sort(as_eigenvalues(eigs))
    raw = alpha_ww(ordered)
    if not np.isfinite(raw.alpha):
        return raw, raw, 0
    for clipped in range(2, max_fingers):
        if clipped >= len(ordered):
            break
        fit = alpha_ww(ordered[:-clipped])
        if not np.isfinite(fit.alpha):
            break
        if fit.alpha + finger_thresh < raw.alpha:
            return replace(fit, num_pl_spikes=int((ordered >= fit.xmin).sum())), raw, clipped - 1
        if fit.alpha <= MIN_ALPHA:
            break
    return raw, raw, 0
