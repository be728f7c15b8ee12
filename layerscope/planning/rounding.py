"""Turning real-valued shares into integer counts."""

from __future__ import annotations

import math

import numpy as np

from layerscope.errors import LayerscopeError


def largest_remainder(weights: list[float], total: int, minimum: int = 0, maximum: int | None = None) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total`` exactly, each in [minimum, maximum].

    Floors of the proportional shares first, then one more to the largest remainders (ties
    to the lower index).  Bounds are met by fixing the entries whose share falls outside them
    and sharing the rest among the others again (Hamilton apportionment under bounds).
    """
    n = len(weights)
    if n == 0:
        raise LayerscopeError("no layers to allocate to")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise LayerscopeError(f"allocation weights must be finite, >= 0 and not all 0 (got {weights})")
    upper = maximum if maximum is not None else total
    if minimum * n > total or upper * n < total:
        raise LayerscopeError(
            f"cannot split {total} over {n} layers with between {minimum} and {upper} each"
        )
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        remaining = total - sum(fixed.values())
        weight_sum = sum(weights[i] for i in free)
        shares = {i: (weights[i] / weight_sum * remaining if weight_sum > 0 else remaining / len(free)) for i in free}
        # Clip one side at a time: clipping the high side frees units for the rest, clipping the
        # low side takes units from them; doing both at once can overshoot the total.
        high = [i for i in free if shares[i] > upper]
        low = [] if high else [i for i in free if shares[i] < minimum]
        if not high and not low:
            break
        fixed.update({i: upper for i in high} | {i: minimum for i in low})
    counts = {i: math.floor(shares[i]) for i in free}
    leftover = remaining - sum(counts.values())
    order = sorted(free, key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:leftover]:
        counts[i] += 1
    counts.update(fixed)
    return [counts[i] for i in range(n)]


def reference_rounding(values: list[float], total: int, beta: float) -> list[int]:
    """AlphaLoRA's ``exponential_scaling``, reproduced behaviour for behaviour.

    np.round of the normalised shares of values**beta times ``total``; then, while the sum is
    off, +1 at argmin(values**beta - counts) or -1 at argmax(values**beta - counts).  The
    fix-up compares the *unnormalised* powers with the counts, as the reference does, so it
    can move experts to the wrong layers and even give a layer 0 or a negative count.
    """
    powered = np.power(np.asarray(values, dtype=float), beta)
    counts = np.round(powered / powered.sum() * total).astype(int)
    while counts.sum() != total:  # each step moves the sum one closer: terminates
        if total - counts.sum() > 0:
            counts[np.argmin(powered - counts)] += 1
        else:
            counts[np.argmax(powered - counts)] -= 1
    return [int(c) for c in counts]
