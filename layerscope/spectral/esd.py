"""Empirical spectral densities: eigenvalues of the smaller Gram matrix, batched by shape.

ESD of W (N x M after making it tall, N >= M) = eigenvalues of the M x M Gram WᵀW,
raw (not divided by N), as WeightWatcher, TempBalance and AlphaLoRA use them.

Precision policy
----------------
``f64``  Gram and eigenvalues in float64.  Exact enough for every estimator; this is what
         makes ``alpha`` equal WeightWatcher's to ~1e-9.
``f32``  Gram and eigenvalues in float32 (about 1.5x faster on CPU, far faster on GPUs
         without strong float64).  The top of the spectrum is accurate to ~1e-6 relative,
         but the smallest eigenvalues can be wrong by orders of magnitude.  Guard: after
         fitting, every matrix whose chosen xmin (for ``alpha`` or ``alpha_peak``) lies
         below ``F32_GUARD`` x the float32 noise floor eps32 * sqrt(N) * lambda_max is
         recomputed in float64, and its ``precision`` column says so.
``auto`` f64 on CPU (float64 costs ~1.3x there, eigvalsh dominates), guarded f32 on CUDA.
"""

from __future__ import annotations

import math

import torch

from layerscope.errors import LayerscopeError

PRECISIONS = ("auto", "f64", "f32")
F32_GUARD = 1e3
GRAM_CHUNK_BYTES = 16 << 20  # working-dtype rows converted at a time while accumulating a Gram


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LayerscopeError(f"--device {device!r}: not a torch device (auto, cpu, cuda, cuda:N)") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise LayerscopeError(f"--device {device}: no such CUDA device ({count} available; use auto or cpu)")
    elif resolved.type != "cpu":
        raise LayerscopeError(f"--device {device!r}: only cpu and cuda are supported")
    return resolved


def working_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise LayerscopeError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "f64" or (precision == "auto" and device.type == "cpu"):
        return torch.float64
    return torch.float32


def gram_eigenvalues(batch: torch.Tensor, dtype: torch.dtype,
                     chunk_bytes: int = GRAM_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues of WᵀW for each W in a (B, rows, cols) batch, and whether W is finite.

    Each W is first made tall, so the Gram is min(rows, cols) square.  W stays in its stored
    dtype (bf16, f16, ...); the Gram is accumulated over row chunks converted to ``dtype`` one at
    a time, so no full-size float64 copy of a large matrix ever exists.  Matrices with NaN/Inf
    get a zero Gram (and ``finite`` False) instead of breaking the batched eigensolver.  Tiny
    negative eigenvalues from rounding are clamped to 0 (a Gram matrix is positive semi-definite).
    """
    if batch.shape[-2] < batch.shape[-1]:
        batch = batch.mT
    count, rows, cols = batch.shape
    step = max(1, chunk_bytes // (count * cols * torch.finfo(dtype).bits // 8))
    gram = torch.zeros(count, cols, cols, dtype=dtype, device=batch.device)
    for start in range(0, rows, step):
        chunk = batch[:, start:start + step, :].to(dtype)
        gram.baddbmm_(chunk.mT, chunk)
    # Any NaN/Inf in a column of W reaches that column's diagonal entry Σ w², so the diagonal tells.
    finite = torch.isfinite(torch.diagonal(gram, dim1=1, dim2=2)).all(dim=1)
    gram[~finite] = 0
    return torch.linalg.eigvalsh(gram).clamp_min_(0), finite


def f32_noise_floor(lambda_max: float, n_rows: int) -> float:
    """Typical absolute error of float32 Gram eigenvalues (eps32 * sqrt(N) * lambda_max)."""
    return torch.finfo(torch.float32).eps * math.sqrt(n_rows) * lambda_max


def f32_fit_is_trustworthy(xmins: list[float], lambda_max: float, n_rows: int) -> bool:
    floor = F32_GUARD * f32_noise_floor(lambda_max, n_rows)
    return all(not math.isfinite(x) or x >= floor for x in xmins)
