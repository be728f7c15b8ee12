"""One matrix (or a batch of one shape) to a table row: Gram eigenvalues, tail fits, norm metrics, notes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from layerscope.spectral import detx, esd, fingers, rank, rmt, tpl, vectors
from layerscope.spectral.columns import MATRIX_ESTIMATORS
from layerscope.spectral.estimators import ESTIMATORS, MIN_EVALS, TailFit, alpha_peak
from layerscope.spectral.metrics import norm_metrics


@dataclass(frozen=True)
class RowOptions:
    """What a row's fits take beyond the estimators: the rank estimator's tolerance, WeightWatcher's finger fix and
    its xmax / xmin_max."""

    tolerance: float = rank.WEAK_RANK_TOLERANCE
    fix_fingers: str | None = None  # "clip_xmax": see layerscope.spectral.fingers
    max_fingers: int = fingers.DEFAULT_MAX_FINGERS
    finger_thresh: float = fingers.DEFAULT_FINGER_THRESH
    xmax: int | None = None  # WeightWatcher's integer xmax: the alpha fit leaves out this many largest eigenvalues
    xmin_max: float | None = None  # WeightWatcher's xmin_max: the top of alpha_peak's xmin window (raw units)


@dataclass
class Matrix:
    """One matrix to analyse: its table identity and its weights (2-D, as stored), or a convolution kernel's
    matrices ``(rf, out, in)`` whose eigenvalues are pooled into one ESD (layerscope.spectral.conv)."""

    row: dict
    weight: torch.Tensor
    owner: int = -1  # index of the selected tensor it comes from
    scale: float = 1.0  # what the eigenvalues are multiplied by (WeightWatcher's conv2d_norm)

    @property
    def pooled(self) -> bool:
        return self.weight.dim() == 3


def analyse_batch(matrices: list[Matrix], device: torch.device, dtype: torch.dtype, estimators: tuple[str, ...],
                  bar: tqdm, options: RowOptions = RowOptions()) -> list[dict]:
    """Rows for matrices of one shape: their Gram eigenvalues in one batched call, then each row's fits."""
    if matrices and matrices[0].pooled:
        return [_pooled_row(matrix, device, dtype, estimators, bar, options) for matrix in matrices]
    rows: list[dict] = []
    good = [m for m in matrices if min(m.weight.shape) >= MIN_EVALS]
    eig_iter, finite_iter, exponent_iter = iter([]), iter([]), iter([])
    if good:
        weights = [m.weight for m in good]
        stacked = (weights[0][None] if len(weights) == 1 else torch.stack(weights)).to(device)
        eigs_batch, finite, exponents = esd.scaled_gram_eigenvalues(stacked, dtype)
        del stacked
        eig_iter, finite_iter, exponent_iter = iter(eigs_batch), iter(finite.tolist()), iter(exponents.tolist())
    for matrix in matrices:
        exponent = 0
        if min(matrix.weight.shape) < MIN_EVALS:
            eigs, status = None, "too_few_evals"
        else:
            eigs, is_finite, exponent = next(eig_iter), next(finite_iter), next(exponent_iter)
            eigs, status = (eigs, "ok") if is_finite else (None, "nonfinite_weights")
        rows.append(analyse_matrix(matrix, eigs, estimators, status, exponent, options))
        bar.update(1)
    return rows


def _pooled_row(matrix: Matrix, device: torch.device, dtype: torch.dtype, estimators: tuple[str, ...], bar: tqdm,
                options: RowOptions) -> dict:
    """A convolution kernel's row: the eigenvalues of its position matrices, pooled (their count is M·rf)."""
    if min(matrix.weight.shape[-2:]) * len(matrix.weight) < MIN_EVALS:
        row = analyse_matrix(matrix, None, estimators, "too_few_evals", 0, options)
    else:
        eigs = pooled_eigenvalues(matrix.weight.to(device), dtype)
        row = analyse_matrix(matrix, eigs, estimators, "ok" if eigs is not None else "nonfinite_weights", 0, options)
    bar.update(1)
    return row


def pooled_eigenvalues(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The Gram eigenvalues of every matrix of ``(rf, out, in)``, in true units, in one ascending float64 vector;
    None when a weight is not finite (or beyond float64's range)."""
    return pooled(*esd.scaled_gram_eigenvalues(positions, dtype))


def pooled(eigs: torch.Tensor, finite: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor | None:
    """:func:`esd.scaled_gram_eigenvalues`' output for several matrices as one ascending float64 vector in true
    units, or None (see :func:`pooled_eigenvalues`)."""
    if not bool(finite.all()):
        return None
    values = torch.ldexp(eigs.to(torch.float64), exponents.to(torch.float64)[:, None].to(eigs.device)).flatten()
    return values.sort().values if bool(torch.isfinite(values).all()) else None


def analyse_matrix(matrix: Matrix, eigs: torch.Tensor | None, estimators: tuple[str, ...], status: str,
                    exponent: int = 0, options: RowOptions = RowOptions()) -> dict:
    """One table row; ``eigs × 2^exponent`` are the Gram eigenvalues (exponent ≠ 0 only for extreme weights)."""
    rows_, cols_ = matrix.weight.shape[-2:]
    n_rows, m_cols = max(rows_, cols_), min(rows_, cols_)
    out_features, in_features = (cols_, rows_) if matrix.row.pop("conv1d") else (rows_, cols_)
    shape = matrix.row.pop("shape", None) or f"{rows_}x{cols_}"
    row = {**matrix.row, "shape": shape, "out_features": out_features, "in_features": in_features,
           "N": n_rows, "M": m_cols, "num_evals": m_cols * (len(matrix.weight) if matrix.pooled else 1),
           "status": status, "precision": None, "note": None}
    if eigs is None:
        if status == "too_few_evals":
            row["note"] = (f"{row['num_evals']} eigenvalues ({'pooled over the kernel' if matrix.pooled else 'the smaller side'}); "
                           f"a power-law fit needs at least {MIN_EVALS}")
        elif status == "nonfinite_weights":
            row["note"] = "the weights hold NaN or infinity"
        return row
    used = eigs.dtype
    eigs64, extreme = unscaled(eigs, exponent)
    eigs64 = eigs64 * matrix.scale if matrix.scale != 1 else eigs64
    if float(eigs64[-1]) <= 0:
        row["status"], row["note"] = "zero_matrix", "every weight is zero: no spectrum to fit"
        return row
    fits = _fits(row, eigs64, estimators, options)
    if used == torch.float32 and not esd.f32_fit_is_trustworthy(
        [fits[k].xmin for k in ("alpha", "alpha_peak") if k in fits], float(eigs64[-1]), n_rows
    ):
        if matrix.pooled:
            eigs64, extreme = unscaled(pooled_eigenvalues(matrix.weight.to(eigs.device), torch.float64), 0)
        else:
            eigs, _, exponents = esd.scaled_gram_eigenvalues(matrix.weight.to(eigs.device)[None], torch.float64)
            exponent = int(exponents[0])
            eigs64, extreme = unscaled(eigs[0], exponent)
        eigs64 = eigs64 * matrix.scale if matrix.scale != 1 else eigs64
        fits = _fits(row, eigs64, estimators, options)
        used = "f64 (f32 guard)"
    row["precision"] = {torch.float32: "f32", torch.float64: "f64"}.get(used, used)
    row.update(fit_columns(fits))
    alpha = fits["alpha"].alpha if "alpha" in fits else math.nan
    row.update(norm_metrics(eigs64, n_rows, alpha))
    if "alpha" in fits:
        row["warning"] = rank.warning(alpha)
    notes = [f.note for f in fits.values() if f.note]
    notes += _matrix_estimates(row, matrix, eigs64, estimators, extreme, options.tolerance)
    if extreme:
        _rescale_extreme(row, exponent, alpha)
        notes.append(EXTREME_NOTE)
    row["note"] = "; ".join(notes) if notes else None
    return row


def _matrix_estimates(row: dict, matrix: Matrix, eigs: np.ndarray, estimators: tuple[str, ...],
                      extreme: bool, tolerance: float) -> list[str]:
    """FARMS, MP fit and randomized ESD columns (layerscope.spectral.rmt), rank diagnostics
    (layerscope.spectral.rank), the detX constraint (layerscope.spectral.detx), eigenvector localization
    (layerscope.spectral.vectors), truncated power laws (layerscope.spectral.tpl); returns notes."""
    wanted = [e for e in MATRIX_ESTIMATORS if e in estimators]
    if not wanted:
        return []
    if extreme:
        return [f"{', '.join(wanted)}: not computed for weights beyond float64's range"]
    notes = []
    n_rows, m_cols = max(matrix.weight.shape[-2:]), min(matrix.weight.shape[-2:])
    if matrix.pooled and (skipped := [e for e in ("alpha_farms", "rand", "vectors") if e in wanted]):
        notes.append(f"{', '.join(skipped)}: not computed for a pooled convolution kernel (pool=False gives a row "
                     "per kernel position)")
        wanted = [e for e in wanted if e not in skipped]
    weight = matrix.weight.double() * math.sqrt(matrix.scale) if matrix.scale != 1 else matrix.weight  # as its eigs
    if "alpha_farms" in wanted:
        pooled = rmt.farms_eigenvalues(weight)
        fit = ESTIMATORS["alpha_peak"](np.clip(pooled, 0, None))
        row.update(alpha_farms=fit.alpha, xmin_farms=fit.xmin, num_evals_farms=len(pooled))
        if fit.note:
            notes.append(f"alpha_farms: {fit.note}")
    if "mp" in wanted:
        row.update(rmt.mp_fit(eigs, n_rows, m_cols))
    if "rand" in wanted:
        row.update(rmt.randomized_esd(weight, eigs, row["name"]))
    if "rank" in wanted:
        row.update(rank.rank_diagnostics(weight, tolerance))
    if "detx" in wanted:
        row.update(detx.detx_constraint(eigs, row.get("num_pl_spikes")))
    if "vectors" in wanted:
        row.update(vectors.localization(weight, row.get("num_pl_spikes", math.nan)))
    for name in ("tpl", "e_tpl"):
        if name in wanted:
            columns, note = tpl.truncated_power_law(eigs, name)
            row.update(columns)
            notes += [note] if note else []
    return notes


def unscaled(eigs: torch.Tensor, exponent: int) -> tuple[np.ndarray, bool]:
    """float64 eigenvalues in true units, or (when float64 cannot hold them) still scaled, flagged extreme."""
    scaled = eigs.to(torch.float64).cpu().numpy()
    if exponent == 0:
        return scaled, False
    with np.errstate(over="ignore", under="ignore"):  # out of float64's range is what this checks for
        unscaled = np.ldexp(scaled, exponent)
    if np.isfinite(unscaled[-1]) and unscaled[-1] >= np.finfo(np.float64).tiny:
        return unscaled, False
    return scaled, True


EXTREME_NOTE = ("eigenvalues beyond float64's range: alpha/alpha_hill and the log norms are exact, lambda_max "
                "and the xmins are not representable, alpha_peak (not scale-invariant) is left out")


def _rescale_extreme(row: dict, exponent: int, alpha: float) -> None:
    """Metrics of eigenvalues known as λ' × 2^exponent that float64 cannot hold: scale-invariant ones
    stay; log norms shift by exponent·log10(2); the rest are not representable (NaN)."""
    shift = exponent * math.log10(2)
    row["log_norm"] += shift
    row["log_spectral_norm"] += shift
    if math.isfinite(alpha):
        row["log_alpha_norm"] += alpha * shift
        row["alpha_weighted"] = alpha * row["log_spectral_norm"]
    for column in ("lambda_max", "xmin", "xmin_hill", "xmin_peak", "alpha_peak", "D_peak"):
        if column in row:
            row[column] = math.nan


def _fits(row: dict, eigs: np.ndarray, estimators: tuple[str, ...], options: RowOptions) -> dict[str, TailFit]:
    """The tail fits.  ``alpha`` sees the eigenvalues without the ``xmax`` largest (WeightWatcher's integer xmax);
    with the finger fix it is the clipped fit, and the row gets raw_alpha, num_fingers.  ``alpha_peak``'s window
    ends at ``xmin_max`` when given."""
    plain = tuple(name for name in estimators if name not in ("alpha", "alpha_peak"))
    fits = fit_all(eigs, plain)
    if "alpha_peak" in estimators:
        fits["alpha_peak"] = alpha_peak(eigs, xmin_max=options.xmin_max)
    if "alpha" not in estimators:
        return fits
    clipped = eigs
    if options.xmax:
        if options.xmax > len(eigs) / 2:
            fits["alpha"] = TailFit.failed(f"alpha: xmax {options.xmax} leaves out more than half of the "
                                           f"{len(eigs)} eigenvalues")
            if options.fix_fingers:
                row.update(raw_alpha=math.nan, num_fingers=math.nan)
            return fits
        clipped = eigs[: len(eigs) - options.xmax]
    if options.fix_fingers:
        fits["alpha"], raw, count = fingers.clipped_fit(clipped, options.max_fingers, options.finger_thresh)
        row.update(raw_alpha=raw.alpha, num_fingers=count)
    else:
        fits["alpha"] = ESTIMATORS["alpha"](clipped)
    return fits


def fit_all(eigs: torch.Tensor, estimators: tuple[str, ...]) -> dict[str, TailFit]:
    return {name: ESTIMATORS[name](eigs) for name in estimators if name in ESTIMATORS}


def fit_columns(fits: dict[str, TailFit]) -> dict:
    out: dict = {}
    if "alpha" in fits:
        f = fits["alpha"]
        out.update(alpha=f.alpha, xmin=f.xmin, D=f.D, sigma=f.sigma, num_pl_spikes=f.num_pl_spikes)
    if "alpha_hill" in fits:
        out.update(alpha_hill=fits["alpha_hill"].alpha, xmin_hill=fits["alpha_hill"].xmin)
    if "alpha_peak" in fits:
        f = fits["alpha_peak"]
        out.update(alpha_peak=f.alpha, xmin_peak=f.xmin, D_peak=f.D)
    return out
