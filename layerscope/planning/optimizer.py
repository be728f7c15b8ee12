"""Per-layer optimizer settings from the spectra: TempBalance learning rates, AlphaDecay weight decay.

Both map a per-layer metric (default ``alpha_hill``, TempBalance's ``median`` power-law fit) linearly
onto a range of multipliers, as the reference codes' ``tb_linear_map`` does (``np.interp`` of the
layer's value between the smallest and the largest over the layers):

* TempBalance (Zhou et al., NeurIPS 2023): lr_l = lr · (0.5 + (α_l − α_min)/(α_max − α_min) · 1.0) —
  heavier-tailed (better trained, smaller α) layers get smaller learning rates, range [0.5, 1.5]·lr.
* AlphaDecay (module-wise weight decay, 2025): wd_l = wd · (0.667 + (α_l − α_min)/(α_max − α_min) ·
  (3 − 0.667)) — range [0.667, 3]·wd, larger α gets more decay.

When every layer has the same value the map is undefined; every multiplier is then 1 (the base
setting), where the reference's ``np.interp`` would return the upper end.
"""

from __future__ import annotations

import math

from layerscope.errors import LayerscopeError

METHODS = {"tempbalance": ("lr_scale", 0.5, 1.5), "alphadecay": ("weight_decay_scale", 0.667, 3.0)}
DEFAULT_METRIC = "alpha_hill"


def linear_map(values: dict[int, float], low: float, high: float) -> dict[int, float]:
    """Each value mapped linearly from [min, max] of ``values`` onto [low, high]."""
    smallest, largest = min(values.values()), max(values.values())
    if largest == smallest:
        return {layer: 1.0 for layer in values}
    return {layer: low + (v - smallest) / (largest - smallest) * (high - low) for layer, v in values.items()}


def optimizer_section(layer_metric: dict[int, float], methods: list[str], metric: str) -> dict:
    """The plan's ``optimizer`` section: per layer, its metric and the multipliers of each method."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise LayerscopeError(f"--optimizer {','.join(methods)}: expected any of {', '.join(METHODS)}")
    bad = [layer for layer, v in layer_metric.items() if not math.isfinite(v)]
    if bad:
        raise LayerscopeError(f"--optimizer: metric {metric!r} is not finite for layer {bad[0]}")
    layers = {layer: {"layer": layer, "metric": value} for layer, value in sorted(layer_metric.items())}
    ranges = {}
    for method in methods:
        column, low, high = METHODS[method]
        ranges[method] = [low, high]
        for layer, scale in linear_map(layer_metric, low, high).items():
            layers[layer][column] = scale
    return {"metric": metric, "methods": list(methods), "ranges": ranges, "layers": list(layers.values())}
