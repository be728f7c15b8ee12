"""Empirical spectral densities: eigenvalues of the smaller Gram matrix, batched by shape.

ESD of W (N x M after making it tall, N >= M) = eigenvalues of the M x M Gram WᵀW,
raw (not divided by N), as WeightWatcher, TempBalance and AlphaLoRA use them.

Precision policy
----------------
``f64``  Gram and eigenvalues in float64.  Exact enough for every estimator; this is what
         makes ``alpha`` equal WeightWatcher's to ~1e-12.
``f32``  Gram and eigenvalues in float32 (about 1.7x faster on CPU, far faster on GPUs
         without strong float64).  The top of the spectrum is accurate to ~1e-6 relative,
         but the smallest eigenvalues can be wrong by orders of magnitude.  Guard: after
         fitting, every matrix whose chosen xmin (for ``alpha`` or ``alpha_peak``) lies
         below ``F32_GUARD`` x the float32 noise floor eps32 * sqrt(N) * lambda_max is
         recomputed in float64, and its ``precision`` column says so.  What the guard cannot
         catch: a KS scan whose two best candidates have D within float32 noise of each other
         may pick the other one (below).
``auto`` float64 on CPU: exact by default.  On CUDA, float64 on data-centre GPUs with full-rate
         FP64 (compute capability 6.0 P100, 7.0 V100, 8.0 A100, 9.0 H100/H200/GH200, 10.0 B200: FP64 at
         1/2 of FP32 or better), guarded float32 on every other GPU (consumer and workstation parts,
         L4/L40, A10, B300: FP64 at 1/32–1/64).  On an H200 float64 cost 13 % more than float32 and
         was exact, while guarded float32 moved one ``alpha_peak`` by 2.45 (benchmarks/RESULTS.md §10).

Why float32 is not the CPU default although it is 1.65x faster on a 7B checkpoint: the KS
scans (``alpha``, ``alpha_peak``) pick the argmin of a D curve that is often flat near its
minimum, and float32 eigenvalue noise moves that argmin.  Measured against float64 on the
226 matrices of a Llama-2-7B-shaped checkpoint (random weights): ``alpha_peak`` moved on 97,
``alpha`` on 8 (by up to 47 %); on MiniLM 1 ``alpha_peak`` of 39 moved.  ``alpha_hill``
(no argmin) stays within 1e-3 relative.  See benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg.blas
import torch

from layerscope.errors import LayerscopeError
from layerscope.names import PRECISIONS

F32_GUARD = 1e3
GRAM_CHUNK_BYTES = 16 << 20  # working-dtype rows converted at a time while accumulating a Gram
# CPU Gram matrices at least this wide use BLAS syrk (half a GEMM's flops): single-threaded, as the scan
# runs small Grams, dsyrk of a 1536x384 weight takes 3.7 ms against 9.0 ms for the GEMM (benchmarks/RESULTS.md).
SYRK_MIN_DIM = 64


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


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise LayerscopeError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


# CUDA compute capabilities of data-centre GPUs whose FP64 runs at half the FP32 rate or better.
FULL_RATE_FP64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def full_rate_fp64(device: torch.device) -> bool:
    """Whether ``device`` computes float64 at data-centre speed (CPUs always do, relative to their float32)."""
    if device.type != "cuda":
        return device.type == "cpu"
    return tuple(torch.cuda.get_device_capability(device)) in FULL_RATE_FP64


def working_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype Gram matrices are computed in under ``precision`` (see the policy above)."""
    check_precision(precision)
    if precision == "f64" or (precision == "auto" and full_rate_fp64(device)):
        return torch.float64
    return torch.float32


# Weights whose largest magnitude lies outside [2^-R, 2^R] are scaled by a power of two before squaring
# (exact), so neither the Gram nor its eigenvalues leave the working dtype's range.
SAFE_EXPONENT = {torch.float64: 400, torch.float32: 40}


def gram_eigenvalues(batch: torch.Tensor, dtype: torch.dtype,
                     chunk_bytes: int = GRAM_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues of WᵀW for each W in a (B, rows, cols) batch (float64 when scaled back),
    and whether W is finite.  Eigenvalues beyond float64's range come back as inf / 0; use
    :func:`scaled_gram_eigenvalues` to keep them."""
    eigs, finite, exponent = scaled_gram_eigenvalues(batch, dtype, chunk_bytes)
    if bool((exponent != 0).any()):
        eigs = torch.ldexp(eigs.to(torch.float64), exponent.to(torch.float64)[:, None])
    return eigs, finite


def scaled_gram_eigenvalues(batch: torch.Tensor, dtype: torch.dtype, chunk_bytes: int = GRAM_CHUNK_BYTES
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eigenvalues, finite, exponent): the eigenvalues of WᵀW are ``eigenvalues × 2^exponent``.

    Each W is first made tall, so the Gram is min(rows, cols) square.  W stays in its stored
    dtype (bf16, f16, ...); the Gram is accumulated over row chunks converted to ``dtype`` one at
    a time, so no full-size float64 copy of a large matrix ever exists.  A W whose largest
    magnitude is extreme (|w| ~ 1e200 in float64, ~1e15 in float32) is scaled by 2^-k first, with
    exponent 2k (exact: powers of two).  Matrices with NaN/Inf get a zero Gram (and ``finite``
    False) instead of breaking the batched eigensolver.  Tiny negative eigenvalues from rounding
    are clamped to 0 (a Gram matrix is positive semi-definite).
    """
    if batch.shape[-2] < batch.shape[-1]:
        batch = batch.mT
    # max |w| from amax and amin: two reductions without a temporary (|W| or a norm kernel cost 20x more)
    largest = torch.maximum(batch.amax(dim=(-2, -1)).abs(), batch.amin(dim=(-2, -1)).abs()).to(torch.float64)
    finite = torch.isfinite(largest)
    _, k = torch.frexp(torch.where(finite & (largest > 0), largest, torch.ones_like(largest)))
    extreme = k.abs() > SAFE_EXPONENT[dtype]
    k = torch.where(extreme & finite, k, torch.zeros_like(k))
    scale = torch.ldexp(torch.ones_like(largest), -k.to(torch.float64)) if bool(extreme.any()) else None
    use_syrk = batch.device.type == "cpu" and batch.shape[-1] >= SYRK_MIN_DIM
    gram = (_grams_syrk if use_syrk else _grams_batched)(batch, dtype, chunk_bytes, scale)
    gram[~finite] = 0
    return torch.linalg.eigvalsh(gram, UPLO="L").clamp_min_(0), finite.to(gram.device), (2 * k).to(torch.int64)


def _converted(chunk: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """A row chunk in the working dtype, scaled first (in float64) when its matrix is extreme."""
    if scale is None:
        return chunk.to(dtype)
    return (chunk.to(torch.float64) * scale.to(chunk.device).reshape(-1, *([1] * (chunk.dim() - 1)))).to(dtype)


def _row_step(count: int, cols: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (count * cols * torch.finfo(dtype).bits // 8))


def _grams_batched(batch: torch.Tensor, dtype: torch.dtype, chunk_bytes: int,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """Full Gram matrices with batched GEMMs (accelerators: one kernel for the whole batch)."""
    count, rows, cols = batch.shape
    step = _row_step(count, cols, dtype, chunk_bytes)
    gram = None
    for start in range(0, rows, step):
        chunk = _converted(batch[:, start:start + step, :], dtype, scale)
        gram = torch.bmm(chunk.mT, chunk) if gram is None else gram.baddbmm_(chunk.mT, chunk)
    return gram


def _grams_syrk(batch: torch.Tensor, dtype: torch.dtype, chunk_bytes: int,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """Lower triangles of the Gram matrices with BLAS ``syrk`` (CPU): half the flops of a GEMM.

    ``batch`` may be a transposed view (wide weights): each row chunk of the tall orientation
    is converted to a C-contiguous array X of the stored layout, and X.T (Fortran-ordered, no
    copy) goes to syrk with the transpose flag that yields the tall Gram.
    """
    count, rows, cols = batch.shape
    stored_wide = batch.stride(-2) == 1 and batch.stride(-1) != 1  # a .mT view of wide weights
    syrk = _SYRK[dtype]
    gram = np.zeros((count, cols, cols), dtype=_NUMPY_DTYPE[dtype])
    step = _row_step(1, cols, dtype, chunk_bytes)
    for b in range(count):
        # gram[b].T is Fortran-ordered; syrk fills its upper triangle, i.e. gram[b]'s lower one.
        out = gram[b].T
        for start in range(0, rows, step):
            rows_chunk = batch[b, start:start + step, :]
            stored = _converted((rows_chunk.mT if stored_wide else rows_chunk).contiguous(), dtype,
                                None if scale is None else scale[b]).numpy()
            out = syrk(1.0, stored.T, beta=1.0, c=out, trans=int(stored_wide), lower=0, overwrite_c=1)
        if not np.shares_memory(out, gram[b]):
            gram[b] = out.T
    return torch.from_numpy(gram)


_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
_SYRK = {torch.float32: scipy.linalg.blas.ssyrk, torch.float64: scipy.linalg.blas.dsyrk}


def f32_noise_floor(lambda_max: float, n_rows: int) -> float:
    """Typical absolute error of float32 Gram eigenvalues (eps32 * sqrt(N) * lambda_max)."""
    return torch.finfo(torch.float32).eps * math.sqrt(n_rows) * lambda_max


def f32_fit_is_trustworthy(xmins: list[float], lambda_max: float, n_rows: int) -> bool:
    floor = F32_GUARD * f32_noise_floor(lambda_max, n_rows)
    return all(not math.isfinite(x) or x >= floor for x in xmins)
