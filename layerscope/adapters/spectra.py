"""Spectra of adapter updates ΔW = s·B·A, computed from the factors (never the full product).

With reduced QR factorisations Aᵀ = Q_A R_A and B = Q_B R_B, ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, and the
orthonormal Q's do not change singular values: the r nonzero eigenvalues of ΔWᵀΔW are the squared
singular values of the r×r core C = s·R_B·R_Aᵀ.  Cost O((in + out)·r²) per module instead of
O(in·out·min(in, out)).

Sources:

* a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``):
  s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern``
  keys are matched against module names as PEFT matches them (the key is a suffix of the module
  name at a dot boundary), and the stored factors' rank must agree with the config.
* a layerscope MoE-LoRA adapter folder (``adapter.safetensors`` from ``save_adapters``): one row per
  module and expert, ΔW_e = (lora_alpha / r)·B_e·A_e; MoR experts ΔW_e = s·diag(λ_B,e)·B·diag(λ_A,e)·A.

A rank-r update has r nonzero eigenvalues (the other min(in, out) − r are zero by construction and
left out of the ESD).  The norm metrics (λ_max, log norms, stable rank; entropy for r ≥ 2) are
defined for any r; the power-law fits need at least 8 eigenvalues, so for r < 8 they are NaN and
the row's status is ``too_few_evals``.  With ``base=MODEL`` each module's W + ΔW (formed
explicitly, one at a time, in float64) is analysed too, as kind ``merged``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from layerscope.adapters.incremental import MergedEigenvalues
from layerscope.adapters.updates import (
    ADAPTER_COLUMNS,
    OURS,
    Update,
    adapter_kind,
    base_tensor,
    delta_eigenvalues,
    explicit_delta,
    layerscope_updates,
    peft_updates,
)
from layerscope.checkpoint.naming import detect_scheme
from layerscope.checkpoint.reader import Checkpoint, open_checkpoint
from layerscope.errors import LayerscopeError
from layerscope.spectral.estimators import ESTIMATORS, MIN_EVALS
from layerscope.spectral.metrics import norm_metrics


def scan_adapter(folder: str | Path, *, base: str | Path | None = None,
                 estimators: tuple[str, ...] = ("alpha", "alpha_hill", "alpha_peak"), progress: bool = True
                 ) -> pd.DataFrame:
    """One row per adapted module (and expert): the spectrum of ΔW, and of W + ΔW with ``base``."""
    folder = Path(folder)
    kind = adapter_kind(folder)
    if kind is None:
        raise LayerscopeError(f"{folder}: not an adapter folder (adapter_config.json or {OURS})")
    updates = peft_updates(folder) if kind == "peft" else layerscope_updates(folder)
    base_ckpt = open_checkpoint(base) if base is not None else None
    table = updates_table(updates, base_ckpt, estimators, progress)
    table.attrs.update(path=str(folder), adapter=kind, architecture=f"{kind} adapter",
                       base=str(base) if base is not None else None)
    return table


def updates_table(updates: list[Update], base_ckpt: Checkpoint | None, estimators: tuple[str, ...],
                  progress: bool, merged_source: MergedEigenvalues | None = None) -> pd.DataFrame:
    """Rows of kind ``delta`` (ΔW from its factors) and, with a base, ``merged`` (W + ΔW) for each update;
    ``merged_source`` may give W + ΔW's eigenvalues from a kept base eigendecomposition (spectra while
    training)."""
    from tqdm.auto import tqdm

    from layerscope.spectral.analysis import fit_all, fit_columns
    from layerscope.spectral.columns import FIT_COLUMNS, IDENTITY_COLUMNS, METRIC_COLUMNS

    scheme = detect_scheme({}, [f"{u.module}.weight" for u in updates])
    rows = []
    for update in tqdm(updates, desc="adapter", unit="update", disable=(not progress) or None):
        role = scheme.classify(f"{update.module}.weight", (update.B.shape[0], update.A.shape[1]), "F32")
        identity = {"name": update.module if update.expert is None else f"{update.module}[{update.expert}]",
                    "tensor": update.tensor, "file": update.file, "kind": "delta", "stack": role.stack,
                    "layer": role.layer, "stack_layer": role.stack_layer, "role": role.role, "module": update.module,
                    "expert": update.expert, "part": None, "dtype": update.dtype,
                    "quantization": None}
        rows.append(_delta_row(identity, update, estimators, fit_all, fit_columns))
        if base_ckpt is not None:
            rows.append(_merged_row(identity, update, base_ckpt, estimators, merged_source))
    columns = [*IDENTITY_COLUMNS, "N", "M", "num_evals", *ADAPTER_COLUMNS]
    for name in ESTIMATORS:  # spectral estimators only: the matrix ones need the full ΔW
        if name in estimators:
            columns += FIT_COLUMNS[name]
    table = pd.DataFrame(rows, columns=[*columns, *METRIC_COLUMNS, "status", "precision", "note"])
    table.attrs.update(naming=scheme.name, estimators=list(estimators), precision="f64", device="cpu",
                       num_layers=int(table["layer"].max()) + 1 if table["layer"].notna().any() else None)
    return table


def _delta_row(identity: dict, update: Update, estimators, fit_all, fit_columns) -> dict:
    out_f, in_f = update.B.shape[0], update.A.shape[1]
    eigs = delta_eigenvalues(update.A, update.B, update.scaling)
    r = len(eigs)
    row = {**identity, "shape": f"{out_f}x{in_f}", "out_features": out_f, "in_features": in_f,
           "N": max(out_f, in_f), "M": min(out_f, in_f), "num_evals": r, "lora_rank": update.A.shape[0],
           "lora_scaling": update.scaling, "status": "ok", "precision": "f64", "note": None}
    if eigs[-1] <= 0:
        row["status"] = "zero_matrix"
        row["note"] = "ΔW = 0 (B is zero: an untrained adapter)"
        return row
    notes = []
    if r >= MIN_EVALS:
        fits = fit_all(eigs, estimators)
        row.update(fit_columns(fits))
        alpha = fits["alpha"].alpha if "alpha" in fits else math.nan
        notes += [f.note for f in fits.values() if f.note]
    else:
        alpha = math.nan
        row["status"] = "too_few_evals"
        notes.append(f"rank {r}: power-law fits need at least {MIN_EVALS} eigenvalues; norm metrics only")
    row.update(norm_metrics(eigs, max(out_f, in_f), alpha))
    if r < 2:
        row["entropy"] = math.nan
        notes.append("entropy is undefined for one eigenvalue")
    row["note"] = "; ".join(notes) if notes else None
    return row


def _merged_row(identity: dict, update: Update, base: Checkpoint, estimators,
                source: MergedEigenvalues | None = None) -> dict:
    from layerscope.spectral import esd
    from layerscope.spectral.analysis import Matrix, analyse_matrix
    from layerscope.spectral.columns import MATRIX_ESTIMATORS

    name = base_tensor(base, update.module)
    weight = base.load(name).to(torch.float64)
    row = {**identity, "name": identity["name"] + "+base", "tensor": name, "file": base.tensors[name].file.name,
           "kind": "merged", "dtype": "F64", "conv1d": False}
    eigs, note = None, None
    if (source is not None and weight.dim() == 2 and not set(estimators) & set(MATRIX_ESTIMATORS)
            and source.wanted(tuple(weight.shape), update.A.shape[0])):
        eigs, note = source.eigenvalues(name, weight, update)
    if eigs is not None:  # the matrix itself is only needed for its shape
        result = analyse_matrix(Matrix(row, weight), eigs, estimators, "ok")
    else:
        merged = weight + explicit_delta(update, tuple(weight.shape), f"{base.path}: {name}")
        gram_eigs, finite, exponents = esd.scaled_gram_eigenvalues(merged[None], torch.float64)
        result = analyse_matrix(Matrix(row, merged), gram_eigs[0] if bool(finite[0]) else None, estimators,
                                "ok" if bool(finite[0]) else "nonfinite_weights", int(exponents[0]))
    if note:
        result["note"] = "; ".join(n for n in (result.get("note"), note) if n)
    result.update(lora_rank=update.A.shape[0], lora_scaling=update.scaling)
    return result
