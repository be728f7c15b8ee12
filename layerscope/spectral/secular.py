"""Eigenvalues after a low-rank symmetric update of a known eigendecomposition (the secular equation).

A LoRA update ΔW = s·B·A has rank r, so the Gram matrix of W + ΔW is the base Gram plus a symmetric update
of rank at most 2r.  With the base Gram's eigendecomposition G = Q·diag(λ)·Qᵀ kept from a first scan, the
updated eigenvalues follow from 2r rank-one updates, each solved as LAPACK's divide-and-conquer merge does
(``dlaed2`` / ``dlaed3`` / ``dlaed4``):

* the update F·C·Fᵀ is rewritten as Σ_t ρ_t·y_t·y_tᵀ with orthonormal y_t (a QR of F and a 2r × 2r
  eigendecomposition), and the y_t are expressed in the eigenbasis, z_t = Qᵀ·y_t: O(M²r);
* each rank-one update diag(d) + ρ·z·zᵀ deflates the components of z too small to matter and the pairs of
  nearly equal d (a Givens rotation zeroes one of their components), then finds the remaining eigenvalues,
  one in each interval between consecutive poles, as the roots of the secular equation
  1/ρ + Σ_i z_i² / (d_i − x) = 0.  Each root is kept as an offset from its nearer pole, so that the
  differences d_i − x are exact to rounding, and is found with a two-pole rational model of the function
  (the "middle way" of dlaed4), safeguarded by bisection;
* the later terms are carried into the new eigenbasis through the eigenvectors of the update, formed from
  a recomputed ẑ (Gu and Eisenstat) so that they are orthogonal to working precision: O(M²) per term and
  per later term, never an M × M eigenvector matrix product.

So the cost is O(M²r²) elementwise work instead of the O(M³) of a full eigendecomposition.  Each result is
checked against two invariants that are cheap to compute exactly — the trace and the squared Frobenius norm
of the updated matrix — and the caller falls back to the full eigendecomposition when the check fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = torch.finfo(torch.float64).eps
CHUNK_ELEMENTS = 1 << 22  # roots × poles evaluated at once: 32 MiB per float64 temporary
MAX_ITERATIONS = 80  # bisection alone halves a bracket 52 times to reach float64 resolution


@dataclass(frozen=True)
class UpdatedSpectrum:
    """The updated eigenvalues (ascending, float64) and how far they miss the two exact invariants."""

    eigenvalues: torch.Tensor
    invariant_error: float  # max of |Σx − trace| / ‖G'‖_F and |Σx² − ‖G'‖_F²| / (2‖G'‖_F²)
    unconverged: int  # roots that hit MAX_ITERATIONS
    deflated: int  # components deflated over all rank-one terms
    terms: int  # rank-one terms applied


def updated_eigenvalues(values: torch.Tensor, vectors: torch.Tensor, factors: torch.Tensor,
                        core: torch.Tensor) -> UpdatedSpectrum:
    """Eigenvalues of Q·diag(values)·Qᵀ + F·C·Fᵀ, with Q = ``vectors`` (M × M, orthogonal), F = ``factors``
    (M × k) and C = ``core`` (k × k, symmetric); everything in float64."""
    values, vectors = values.to(torch.float64), vectors.to(torch.float64)
    factors, core = factors.to(torch.float64), core.to(torch.float64)
    basis, triangle = torch.linalg.qr(factors)  # F = P·R, P orthonormal (M × k)
    small = triangle @ core @ triangle.T
    rho, mixing = torch.linalg.eigh((small + small.T) / 2)  # F·C·Fᵀ = Σ ρ_t y_t y_tᵀ, y = P·E orthonormal
    directions = (vectors.T @ basis) @ mixing  # z_t = Qᵀ·y_t, still orthonormal
    scale = max(float(values.abs().max()), float(rho.abs().max()), 1e-300)
    order = [t for t in torch.argsort(rho.abs(), descending=True).tolist()
             if abs(float(rho[t])) > EPS * scale]
    directions = directions[:, order]
    rho = rho[order]
    trace = float(values.sum() + rho.sum())
    projected = (directions * directions * values[:, None]).sum(0)  # z_tᵀ·Λ·z_t
    frobenius2 = float((values * values).sum() + 2 * (rho * projected).sum() + (rho * rho).sum())
    current, unconverged, deflated = values.clone(), 0, 0
    for t in range(len(order)):
        current, later, missed, dropped = rank_one_update(current, float(rho[t]), directions[:, t],
                                                          directions[:, t + 1:])
        directions[:, t + 1:] = later
        unconverged, deflated = unconverged + missed, deflated + dropped
    norm = math.sqrt(max(frobenius2, 0.0)) or 1.0
    trace_error = abs(float(current.sum()) - trace) / norm
    frobenius_error = abs(float((current * current).sum()) - frobenius2) / (2 * norm * norm)
    return UpdatedSpectrum(current, max(trace_error, frobenius_error), unconverged, deflated, len(order))


def rank_one_update(d: torch.Tensor, rho: float, z: torch.Tensor, later: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """diag(d) + ρ·z·zᵀ with d ascending: (its eigenvalues ascending, ``later``'s columns in its eigenbasis,
    unconverged roots, deflated components)."""
    if rho < 0:  # −(diag(−d) + |ρ| z zᵀ), solved with the order reversed
        flipped, carried, missed, dropped = _positive_update(-d.flip(0), -rho, z.flip(0), later.flip(0))
        return -flipped.flip(0), carried.flip(0), missed, dropped
    return _positive_update(d, rho, z, later)


def _positive_update(d: torch.Tensor, rho: float, z: torch.Tensor, later: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    d, z, later = d.clone(), z.clone(), later.clone()
    norm2 = float((z * z).sum())
    weight = rho * norm2  # the update's size: ρ·‖z‖²
    tol = 8 * EPS * max(float(d.abs().max()), weight)
    unit = z / math.sqrt(norm2) if norm2 > 0 else z
    keep = weight * unit.abs() > tol
    _deflate_close_pairs(d, z, keep, later, tol)
    kept = torch.nonzero(keep).flatten()
    if len(kept) == 0:
        return (*_sorted(d, later), 0, len(d))
    poles, z_kept = d[kept], z[kept]
    origin, offset, missed = secular_roots(poles, z_kept * z_kept, rho)
    if later.shape[1]:
        later[kept] = _eigenvector_transform(poles, z_kept, rho, origin, offset) @ later[kept]
    d[kept] = poles[origin] + offset
    return (*_sorted(d, later), missed, len(d) - len(kept))


def _sorted(d: torch.Tensor, later: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(d, stable=True)
    return d[order], later[order]


def _deflate_close_pairs(d, z, keep, later, tol: float) -> None:
    """dlaed2's second deflation, in place: where two consecutive kept poles differ so little that the
    rotation zeroing the first one's component leaves an off-diagonal (d_b − d_a)·c·s below ``tol``, that
    pole leaves the problem with its rotated value (and ``later``'s rows are rotated with it)."""
    kept = torch.nonzero(keep).flatten()
    if len(kept) < 2:
        return
    a, b = z[kept[:-1]], z[kept[1:]]
    radius = torch.hypot(a, b)
    coupling = (d[kept[1:]] - d[kept[:-1]]) * (b / radius) * (a / radius)
    if not bool((coupling.abs() <= tol).any()):  # the usual case: nothing to rotate
        return
    previous = int(kept[0])
    for index in kept[1:].tolist():
        radius = math.hypot(float(z[previous]), float(z[index]))
        c, s = float(z[index]) / radius, -float(z[previous]) / radius
        if abs((float(d[index]) - float(d[previous])) * c * s) > tol:
            previous = index
            continue
        z[index], z[previous] = radius, 0.0
        keep[previous] = False
        first, second = float(d[previous]), float(d[index])
        d[previous], d[index] = first * c * c + second * s * s, first * s * s + second * c * c
        rows = later[[previous, index]]
        later[previous] = c * rows[0] + s * rows[1]
        later[index] = -s * rows[0] + c * rows[1]
        previous = index


def secular_roots(d: torch.Tensor, z2: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The n roots of 1/ρ + Σ_i z_i² / (d_i − x) = 0 (d strictly ascending, z_i² > 0, ρ > 0): root j lies in
    (d_j, d_{j+1}), the last in (d_{n−1}, d_{n−1} + ρ‖z‖²].  Returned as (origin, offset, unconverged): the
    root is d[origin] + offset, with origin the nearer pole.

    Each root starts at its interval's midpoint; the sign of w there picks the half that holds it (and the
    origin), and the first model step from the midpoint is dlaed4's initial guess."""
    n = len(d)
    index = torch.arange(n)
    gap = torch.empty_like(d)
    gap[:-1] = d[1:] - d[:-1]
    gap[-1] = rho * float(z2.sum())
    half = gap / 2
    evaluated = _secular_terms(d, z2, rho, index, index, half)
    left = evaluated[0] >= 0  # the root is in the interval's left half
    is_last = index == n - 1
    zeros = torch.zeros_like(d)
    origin = torch.where(left | is_last, index, index + 1)
    offset = torch.where(left | is_last, half, -half)  # the midpoint, from the origin
    low = torch.where(left, zeros, torch.where(is_last, half, -half))
    high = torch.where(left, half, torch.where(is_last, gap, zeros))
    active, which = torch.ones(n, dtype=torch.bool), index
    for _ in range(MAX_ITERATIONS):
        w, dpsi, dphi, tolerance = evaluated
        tau, lo, hi = offset[which], low[which], high[which]
        lo = torch.where(w < 0, tau, lo)  # w rises through the interval: the root is right of τ when w < 0
        hi = torch.where(w > 0, tau, hi)
        resolution = 4 * EPS * torch.maximum(d[origin[which]].abs(), tau.abs())
        done = (w.abs() <= tolerance) | (hi - lo <= resolution)
        proposal = tau + _model_step(d, which, origin[which], tau, w, dpsi, dphi, n)
        inside = (proposal > lo) & (proposal < hi) & torch.isfinite(proposal)
        offset[which] = torch.where(done, tau, torch.where(inside, proposal, (lo + hi) / 2))
        low[which], high[which] = lo, hi
        active[which] = ~done
        which = torch.nonzero(active).flatten()
        if len(which) == 0:
            break
        evaluated = _secular_terms(d, z2, rho, which, origin[which], offset[which])
    return origin, offset, int(active.sum())


def _secular_terms(d, z2, rho: float, roots: torch.Tensor, origin: torch.Tensor, offset: torch.Tensor):
    """(w, ψ', φ', tolerance) at x_j = d[origin_j] + offset_j for each root j in ``roots``: ψ sums the poles
    at or left of the root's interval, φ those right of it; w = 1/ρ + ψ + φ.  φ is the total minus ψ: its
    rounding error, a few ulps of |ψ|, is inside the convergence tolerance."""
    n = len(d)
    parts: list[list[torch.Tensor]] = [[] for _ in range(4)]
    step = max(1, CHUNK_ELEMENTS // n)
    poles = torch.arange(n)
    for start in range(0, len(roots), step):
        j, o, tau = roots[start:start + step], origin[start:start + step], offset[start:start + step]
        delta = d[None, :] - d[o][:, None]  # d_i − x_j, exact to rounding near the origin
        delta -= tau[:, None]
        term = z2[None, :] / delta
        on_left = (poles[None, :] <= j[:, None]).to(d.dtype)
        psi = (term * on_left).sum(1)
        phi = term.sum(1) - psi
        term /= delta
        dpsi = (term * on_left).sum(1)
        dphi = term.sum(1) - dpsi
        w = 1 / rho + psi + phi
        tolerance = EPS * (8 * (phi - psi) + 1 / rho + tau.abs() * (dpsi + dphi))
        for part, value in zip(parts, (w, dpsi, dphi, tolerance)):
            part.append(value)
    return tuple(torch.cat(part) for part in parts)


def _model_step(d, roots, origin, tau, w, dpsi, dphi, n: int) -> torch.Tensor:
    """The step η to the root of the two-pole model c + s/(Δ_j − η) + S/(Δ_{j+1} − η) that matches w and its
    slope at x, with Δ = d − x at the interval's two poles (one pole for the last root)."""
    base = d[origin]
    delta_a = (d[roots] - base) - tau
    has_right = roots < n - 1
    delta_b = torch.where(has_right, (d[torch.clamp(roots + 1, max=n - 1)] - base) - tau, torch.ones_like(tau))
    dphi = torch.where(has_right, dphi, torch.zeros_like(dphi))
    c = w - delta_a * dpsi - delta_b * dphi
    b = (delta_a + delta_b) * w - delta_a * delta_b * (dpsi + dphi)
    a0 = delta_a * delta_b * w
    root = torch.sqrt(torch.clamp(b * b - 4 * c * a0, min=0))
    q = 0.5 * (b + torch.where(b >= 0, root, -root))
    first, second = a0 / q, q / c  # the two roots of c·η² − b·η + a0 = 0
    between = (first > delta_a) & (first < delta_b)
    two_pole = torch.where(between, first, second)
    one_pole = delta_a + dpsi * delta_a * delta_a / (w - delta_a * dpsi)  # c + s/(Δ_j − η) = 0
    return torch.where(has_right, two_pole, one_pole)


def _eigenvector_transform(d, z, rho: float, origin, offset) -> torch.Tensor:
    """V with V[j, i] = the i-th coordinate of the j-th unit eigenvector of diag(d) + ρ z zᵀ, from Gu and
    Eisenstat's ẑ (recomputed from the roots, so that the vectors are orthogonal to working precision)."""
    delta = (d[None, :] - d[origin][:, None]) - offset[:, None]  # [j, i] = d_i − x_j
    pole_gaps = d[None, :] - d[:, None]  # [j, i] = d_i − d_j
    ratio = delta / pole_gaps  # (x_j − d_i) / (d_j − d_i) for j ≠ i
    ratio.diagonal().copy_(-delta.diagonal() / rho)  # (x_i − d_i) / ρ
    z_hat2 = ratio.prod(0)
    if not bool(torch.isfinite(z_hat2).all()) or bool((z_hat2 <= 0).any()):
        z_hat2 = torch.exp(ratio.abs().log().sum(0))  # the same product in logs, for extreme spreads
    z_hat = torch.sign(z) * torch.sqrt(z_hat2)
    vectors = z_hat[None, :] / delta
    return vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)


__all__ = ["UpdatedSpectrum", "rank_one_update", "secular_roots", "updated_eigenvalues"]
