"""W + ΔW spectra from the base Gram's eigendecomposition and the update's factors (no full eigensolve).

For ΔW = s·L·R (rank r; L = B, R = A, or transposed for a Conv1D base stored as (in, out)), the Gram of the
tall orientation of W + ΔW is the base Gram plus F·C·Fᵀ with F = [Rᵀ, s·Wᵀ·L] and C = [[s²·LᵀL, I], [I, 0]]
(or F = [L, s·W·Rᵀ], C = [[s²·R·Rᵀ, I], [I, 0]] when W is wide).  The base eigendecomposition is computed
once per module and kept; each later scan costs O(M²r²) in the secular-equation solver
(:mod:`layerscope.spectral.secular`) instead of an O(N·M²) Gram and an O(M³) eigensolve.

Whether that pays is a matter of constants: each of the 2r rank-one terms takes a handful of passes over
M × M elementwise work, against LAPACK's blocked O(M³).  ``benchmarks/bench_secular.py`` measures the ratio;
``mode="auto"`` uses the update only where :data:`SECULAR_COST` predicts it is faster, ``"always"`` and
``"never"`` force the choice.  Every result must meet the trace and Frobenius-norm invariants to
:data:`CHECK_TOLERANCE` with all roots converged; otherwise the full eigendecomposition is used and the row's
note says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerscope.adapters.updates import Update
from layerscope.errors import LayerscopeError
from layerscope.spectral.secular import updated_eigenvalues

MODES = ("auto", "always", "never")
CHECK_TOLERANCE = 1e-10  # relative to ‖G'‖_F; a converged update misses it by ~1e-15
# Measured (benchmarks/bench_secular.py, RESULTS §12b): the update over 2r terms costs about SECULAR_COST·2r·M²
# against eigvalsh's M³ (CPU, float64), so it pays only where M > SECULAR_COST·2r.
SECULAR_COST = 620.0
DEFAULT_MEMORY = 1 << 30  # bytes of kept eigenvectors (M² float64 per module)


@dataclass(frozen=True)
class BaseEigen:
    values: torch.Tensor  # ascending, float64
    vectors: torch.Tensor  # M × M, float64
    wide: bool  # the Gram is W·Wᵀ (W has fewer rows than columns)


@dataclass
class MergedEigenvalues:
    """The eigenvalue source for W + ΔW rows: a per-module cache of base eigendecompositions and the choice
    between the low-rank update and the full eigensolve."""

    mode: str = "auto"
    memory_bytes: int = DEFAULT_MEMORY
    kept: dict[str, BaseEigen] = field(default_factory=dict, repr=False)
    updated: int = 0  # rows whose eigenvalues came from the update
    fell_back: int = 0  # rows where the update missed its check

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LayerscopeError(f"incremental={self.mode!r}: expected one of {', '.join(MODES)}")

    def wanted(self, weight_shape: tuple[int, int], rank: int) -> bool:
        """Whether the update is used for a module of this shape and LoRA rank."""
        if self.mode != "auto":
            return self.mode == "always"
        return min(weight_shape) > SECULAR_COST * 2 * rank

    def eigenvalues(self, key: str, weight: torch.Tensor, update: Update) -> tuple[torch.Tensor | None, str | None]:
        """(eigenvalues of the tall Gram of W + ΔW, None), or (None, why not) for the full eigensolve; ``weight``
        is the base weight in float64 as stored."""
        base = self._base(key, weight)
        if base is None:
            return None, None
        factors, core = gram_update(weight, update)
        result = updated_eigenvalues(base.values, base.vectors, factors, core)
        if result.unconverged or not result.invariant_error <= CHECK_TOLERANCE:
            self.fell_back += 1
            return None, (f"W + ΔW from the full eigendecomposition: the low-rank update missed its check "
                          f"({result.unconverged} roots unconverged, invariant error {result.invariant_error:.1e})")
        self.updated += 1
        return result.eigenvalues.clamp_min(0), None

    def _base(self, key: str, weight: torch.Tensor) -> BaseEigen | None:
        if key in self.kept:
            return self.kept[key]
        side = min(weight.shape)
        used = sum(b.vectors.numel() * 8 for b in self.kept.values())
        if used + side * side * 8 > self.memory_bytes or not bool(torch.isfinite(weight).all()):
            return None
        wide = weight.shape[0] < weight.shape[1]
        gram = weight @ weight.T if wide else weight.T @ weight
        values, vectors = torch.linalg.eigh(gram)
        self.kept[key] = BaseEigen(values, vectors, wide)
        return self.kept[key]


def gram_update(weight: torch.Tensor, update: Update) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, C) with Gram(W + ΔW) = Gram(W) + F·C·Fᵀ, for the tall orientation that the scan's Gram uses."""
    left, right = update.B.to(torch.float64), update.A.to(torch.float64)  # ΔW = s·left·right, (out, in)
    if tuple(weight.shape) != (left.shape[0], right.shape[1]):  # a Conv1D base, stored (in, out)
        left, right = right.T, left.T
    s, r = update.scaling, left.shape[1]
    identity = torch.eye(r, dtype=torch.float64)
    if weight.shape[0] < weight.shape[1]:  # W·Wᵀ
        factors = torch.cat([left, s * (weight @ right.T)], dim=1)
        square = s * s * (right @ right.T)
    else:  # Wᵀ·W
        factors = torch.cat([right.T, s * (weight.T @ left)], dim=1)
        square = s * s * (left.T @ left)
    core = torch.cat([torch.cat([square, identity], 1), torch.cat([identity, torch.zeros_like(identity)], 1)], 0)
    return factors, core


__all__ = ["MODES", "MergedEigenvalues", "gram_update"]
