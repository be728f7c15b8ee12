"""What a fine-tune did to each matrix: metrics of BASE and OTHER side by side, and the spectrum of
the difference W_other − W_base.

Both checkpoints are scanned as usual (one tensor at a time; ``--cache`` applies), then each
analysed tensor is read from both, subtracted in float64 and analysed as a matrix of its own.
The layouts must match: the same analysed tensors with the same shapes (dtypes may differ, e.g. a
bf16 base and an fp32 fine-tune).

Columns per matrix: the identity columns of the scan; ``{metric}_base``, ``{metric}_other`` and
``delta_{metric}`` (other − base) for every metric; ``diff_{metric}`` for the spectrum of the
difference (``diff_status`` is ``zero_matrix`` where the matrix did not change); ``relative_error``
‖W_other − W_base‖_F / ‖W_base‖_F (for a quantized OTHER: the quantization's damage to that matrix).
Either side may be a GGUF file (``layerscope requantize`` writes a second one from a GGUF alone).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from layerscope.checkpoint.quantization import load_logical, logical_tensors
from layerscope.checkpoint.reader import open_checkpoint
from layerscope.errors import LayerscopeError
from layerscope.spectral import esd
from layerscope.spectral.analysis import analyse_matrix, pooled
from layerscope.spectral.columns import IDENTITY_COLUMNS, SUMMARY_COLUMNS
from layerscope.spectral.coverage import wanted
from layerscope.spectral.estimators import MIN_EVALS
from layerscope.spectral.matrices import tensor_matrices
from layerscope.spectral.rank import summary
from layerscope.spectral.scan import ScanOptions, scan

COMPARE_SCHEMA = "layerscope.compare/1"
DIFF_COLUMNS = ["alpha", "alpha_hill", "alpha_peak", "lambda_max", "log_norm", "log_spectral_norm", "stable_rank",
                "entropy", "status", "rank", "note"]


def compare(base: str | Path, other: str | Path, **options) -> pd.DataFrame:
    """Per-matrix comparison of two checkpoints with the same layout (options as for ``scan``)."""
    progress = options.get("progress", True)
    base_table = scan(base, **options)
    other_table = scan(other, **options)
    _check_same_layout(base_table, other_table, base, other)
    diff = _difference_rows(base, other, ScanOptions(**options), progress)
    metrics = [c for c in SUMMARY_COLUMNS if c in base_table.columns]
    merged = base_table[IDENTITY_COLUMNS].copy()
    for column in metrics:
        merged[f"{column}_base"] = base_table[column].to_numpy()
        merged[f"{column}_other"] = other_table[column].to_numpy()
        merged[f"delta_{column}"] = other_table[column].to_numpy() - base_table[column].to_numpy()
    merged["status_base"] = base_table["status"].to_numpy()
    merged["status_other"] = other_table["status"].to_numpy()
    diff = diff.rename(columns={c: f"diff_{c}" for c in DIFF_COLUMNS})
    table = merged.merge(diff, on="name", how="left", validate="one_to_one")
    table["note"] = [_joined_notes(b, o, d) for b, o, d in zip(base_table["note"], other_table["note"], table["diff_note"])]
    table = table.drop(columns=["diff_note"])
    table.attrs.update(schema=COMPARE_SCHEMA, base=str(base), other=str(other), summary=summary_change(base_table, other_table),
                       naming=base_table.attrs.get("naming"), num_layers=base_table.attrs.get("num_layers"),
                       estimators=base_table.attrs.get("estimators"), precision=base_table.attrs.get("precision"))
    return table


def summary_change(base_table: pd.DataFrame, other_table: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """WeightWatcher's model means (``get_summary()``) of both models and their change, metric by metric (None where
    a model has no finite value)."""
    before, after = summary(base_table), summary(other_table)

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {metric: {"base": finite(before[metric]), "other": finite(after[metric]),
                     "change": finite(after[metric] - before[metric])} for metric in before if metric in after}


def _joined_notes(base, other, diff) -> str | None:
    parts = [f"{label}: {text}" for label, text in (("base", base), ("other", other), ("difference", diff))
             if isinstance(text, str) and text]
    return "; ".join(parts) if parts else None


def _check_same_layout(base_table: pd.DataFrame, other_table: pd.DataFrame, base, other) -> None:
    left = dict(zip(base_table["name"], base_table["shape"]))
    right = dict(zip(other_table["name"], other_table["shape"]))
    for name, shape in left.items():
        if name not in right:
            raise LayerscopeError(f"{other}: has no matrix {name!r}, which {base} has (the layouts differ)")
        if right[name] != shape:
            raise LayerscopeError(f"{other}: matrix {name!r} is {right[name]} but {shape} in {base}")
    extra = [name for name in right if name not in left]
    if extra:
        raise LayerscopeError(f"{other}: has matrix {extra[0]!r}, which {base} lacks (the layouts differ)")


def _difference_rows(base, other, opts: ScanOptions, progress: bool) -> pd.DataFrame:
    from layerscope.checkpoint.naming import detect_scheme, scheme_by_name

    left, right = open_checkpoint(base, opts.revision), open_checkpoint(other, opts.revision)
    left_tensors = logical_tensors(left)
    right_tensors = {t.name: t for t in logical_tensors(right)}
    names = [t.name for t in left_tensors]
    scheme = (scheme_by_name(opts.architecture, left.config, names) if opts.architecture
              else detect_scheme(left.config, names))
    selected = [(t, scheme.classify(t.name, t.shape, t.analysable_dtype)) for t in left_tensors]
    selected = [(t, role) for t, role in selected if wanted(t, role, opts.selection())]
    device = esd.resolve_device(opts.device)
    dtype = esd.working_dtype(opts.precision, device)
    rows = []
    for info, role in tqdm(selected, desc="difference", unit="tensor", disable=(not progress) or None):
        base_weight = load_logical(left, info).to(torch.float64)
        weight = load_logical(right, right_tensors[info.name]).to(torch.float64) - base_weight
        base_parts = list(tensor_matrices(left, info, role, base_weight, scheme, opts))
        for matrix, base_part in zip(tensor_matrices(left, info, role, weight, scheme, opts), base_parts,
                                     strict=True):
            if matrix.pooled:  # a convolution kernel: its positions' eigenvalues pooled; the rank is theirs summed
                eigs, finite, exponents = esd.scaled_gram_eigenvalues(matrix.weight.to(device), dtype)
                together = pooled(eigs, finite, exponents)
                status = "ok" if together is not None else "nonfinite_weights"
                if min(matrix.weight.shape[-2:]) * len(matrix.weight) < MIN_EVALS:
                    together, status = None, "too_few_evals"
                row = analyse_matrix(matrix, together, opts.estimators, status)
                row["rank"] = sum(_numerical_rank(e, matrix.weight.shape[-2:]) for e in eigs) \
                    if together is not None else None
            else:
                eigs, finite, exponent = esd.scaled_gram_eigenvalues(matrix.weight.to(device)[None], dtype)
                row = analyse_matrix(matrix, eigs[0] if bool(finite[0]) else None, opts.estimators,
                                     "ok" if bool(finite[0]) else "nonfinite_weights", int(exponent[0]))
                row["rank"] = _numerical_rank(eigs[0], matrix.weight.shape) if bool(finite[0]) else None
            if row["status"] == "ok" and row["rank"] is not None and row["rank"] < MIN_EVALS:
                row["status"] = "low_rank"  # e.g. a LoRA update: too few nonzero eigenvalues for a tail fit
                row["note"] = (f"the difference has rank {row['rank']}: power-law fits need {MIN_EVALS} nonzero "
                               "eigenvalues (the norm metrics are exact)")
            rows.append({"name": row["name"], **{c: row.get(c) for c in DIFF_COLUMNS},
                         "relative_error": _relative_error(matrix.weight, base_part.weight)})
    return pd.DataFrame(rows, columns=["name", *DIFF_COLUMNS, "relative_error"])


def _relative_error(difference: torch.Tensor, base: torch.Tensor) -> float:
    """‖W_other − W_base‖_F / ‖W_base‖_F: how far OTHER moved (a quantization's damage); NaN for a zero base."""
    norm = float(torch.linalg.vector_norm(base.double()))
    return float(torch.linalg.vector_norm(difference.double())) / norm if norm > 0 else float("nan")


def _numerical_rank(eigs: torch.Tensor, shape) -> int:
    """Eigenvalues of WᵀW above λ_max · max(N, M) · ε of the working dtype (numpy's matrix_rank rule, squared)."""
    top = float(eigs.max())
    if top <= 0:
        return 0
    return int((eigs > top * max(shape) * torch.finfo(eigs.dtype).eps).sum())


def compare_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer: means of the base and other metrics and of their change, over projections and experts."""
    targets = table[table["kind"].isin(["projection", "expert"]) & table["layer"].notna()]
    columns = [c for c in table.columns if c.endswith(("_base", "_other")) or c.startswith("delta_")]
    columns = [c for c in columns if not c.startswith("status")] + ["relative_error"]
    summary = targets.groupby(targets["layer"].astype(int), sort=True)[columns].mean()
    summary.insert(0, "changed_matrices", targets.groupby(targets["layer"].astype(int))["diff_status"].apply(
        lambda s: int((s != "zero_matrix").sum())))
    return summary.reset_index()
