"""What every quantized-format module shares: the logical tensor, FP8 dtypes, scale-group arithmetic, errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerscope.checkpoint.dtypes import FLOATING
from layerscope.checkpoint.reader import TensorInfo
from layerscope.errors import LayerscopeError

FP8 = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})


@dataclass(frozen=True)
class LogicalTensor:
    """One weight as the model sees it: its name, real-valued shape and how it is stored."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # stored dtype of the codes (e.g. F8_E4M3, I32) or of the plain tensor
    parts: dict[str, TensorInfo] = field(default_factory=dict)
    quantization: str | None = None

    @property
    def file(self) -> Path:
        return next(iter(self.parts.values())).file

    @property
    def main(self) -> TensorInfo:
        return next(iter(self.parts.values()))

    @property
    def analysable_dtype(self) -> str:
        """The dtype classification should see: quantized weights decode to float64."""
        return "F64" if self.quantization else self.dtype


def bad_tensor(info: TensorInfo, message: str) -> LayerscopeError:
    return LayerscopeError(f"{info.file}: tensor {info.name!r}: {message}")


def need_float(info: TensorInfo) -> None:
    if info.dtype not in FLOATING:
        raise bad_tensor(info, f"scale tensor has dtype {info.dtype}, expected a float dtype")


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def group_size_of(cols: int, groups: int, qconfig: dict) -> int:
    """Columns per group: the config's ``group_size`` when it fits the scale, else ⌈cols / groups⌉."""
    for weights in config_weights(qconfig):
        size = weights.get("group_size")
        if positive_int(size) and math.ceil(cols / size) == groups:
            return size
    return math.ceil(cols / groups)


def group_count(scale: torch.Tensor) -> int:
    return scale.shape[1] if scale.dim() == 2 else 1


def no_zero_point(tensors: dict[str, TensorInfo], base: str, what: str) -> None:
    zero = tensors.get(f"{base}.weight_zero_point")
    if zero is not None:
        raise bad_tensor(zero, f"a zero point with {what} scales is not a format layerscope knows")


def config_weights(qconfig: dict) -> list[dict]:
    """The ``weights`` argument dicts of every compressed-tensors config group."""
    groups = qconfig.get("config_groups")
    if not isinstance(groups, dict):
        return []
    return [g["weights"] for g in groups.values() if isinstance(g, dict) and isinstance(g.get("weights"), dict)]
