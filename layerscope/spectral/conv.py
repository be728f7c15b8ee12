"""Convolution kernels as WeightWatcher analyses them: one matrix per kernel position, pooled into one ESD.

A ``Conv2d`` weight ``(out, in, kh, kw)`` applies, at each of its ``rf = kh·kw`` kernel positions (the receptive
field), the ``out × in`` matrix ``W[:, :, i, j]``; a ``Conv1d`` weight ``(out, in, k)`` one per tap.  WeightWatcher
0.7.7 (``pool=True``, its default) concatenates the eigenvalues of all ``rf`` matrices into one ESD of
``M·rf`` eigenvalues, M the smaller side, and fits that; ``pool=False`` gives one row per position, in its order
(``i`` over the kernel's height, then ``j`` over its width).

``conv2d_norm`` (on by default there) scales each ``Conv2d`` matrix by ``sqrt(count / 2)`` before the ESD, where
``count`` is 1 when pooled and ``rf`` per position; eigenvalues therefore scale by ``1/2`` pooled and ``rf/2``
per position.  Scale-invariant metrics (alpha, alpha_hill, stable_rank) do not move; log norms do.

Where layerscope differs on purpose (docs/weightwatcher.md):

* ``nn.Conv1d``: WeightWatcher hands the 3-D weight to its SVD as is, which reads it as ``out`` matrices of
  ``in × k`` and keeps ``k`` singular values; layerscope analyses ``Conv1d`` like ``Conv2d``, per tap.
* A ``Conv2d`` whose matrices are wide (``out < in``) and whose ``rf`` is even: WeightWatcher swaps N and M once
  per position and so reports N < M; layerscope reports N ≥ M.  The eigenvalues are the same.
* Depthwise kernels (one input channel per group) hold no matrix and get no row; WeightWatcher reads them as an
  ``out × 1`` matrix per position.
"""

from __future__ import annotations

import math

import torch


def has_matrix(shape: tuple[int, ...]) -> bool:
    """Depthwise kernels (one input channel per group) and 3-D-spatial ones get no row."""
    return len(shape) in (3, 4) and shape[1] > 1


def receptive_field(shape: tuple[int, ...]) -> int:
    return math.prod(shape[2:])


def kernel_matrices(weight: torch.Tensor) -> torch.Tensor:
    """``(rf, out, in)``: the matrix at each kernel position, in WeightWatcher's order (row-major over the kernel);
    a view of a contiguous ``weight`` (writing it writes the kernel)."""
    return weight.reshape(*weight.shape[:2], -1).permute(2, 0, 1)


def eigenvalue_scale(shape: tuple[int, ...], pooled: bool, conv2d_norm: bool) -> float:
    """What ``conv2d_norm`` multiplies a Conv2d's eigenvalues by (1 for Conv1d, or with the norm off)."""
    if not conv2d_norm or len(shape) != 4:
        return 1.0
    return 0.5 if pooled else receptive_field(shape) / 2


def position_label(shape: tuple[int, ...], index: int) -> str:
    """``i,j`` for a Conv2d position, ``i`` for a Conv1d tap."""
    if len(shape) == 4:
        return f"{index // shape[3]},{index % shape[3]}"
    return str(index)
