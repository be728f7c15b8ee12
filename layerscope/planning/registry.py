"""Every allocation strategy by its command-line name (:mod:`layerscope.names` holds the names alone)."""

from __future__ import annotations

from collections.abc import Callable

from layerscope.planning.measured import sensitivity, value
from layerscope.planning.strategies import StrategyResult, adaptive_lora, alphalora, hilo, mola, uniform

STRATEGIES: dict[str, Callable[..., StrategyResult]] = {
    "alphalora": alphalora,
    "mola": mola,
    "hilo": hilo,
    "adaptive-lora": adaptive_lora,
    "sensitivity": sensitivity,
    "value": value,
    "uniform": uniform,
}
