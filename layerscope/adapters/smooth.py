"""SVD smoothing, as WeightWatcher's ``SVDSmoothing``: each chosen matrix replaced by its best rank-k
approximation (its k largest singular triplets), written as a checkpoint in the source's layout.

k per matrix comes from the method (WeightWatcher's names):

* ``svd``: ``int(percent · M · rf)`` of the M eigenvalues (M·rf for a pooled convolution kernel);
* ``detX``: the detX constraint's ``detX_num`` (the ``detx`` estimator);
* ``alpha_min``: the power-law tail, ``num_pl_spikes`` of the ``alpha`` fit.

A negative k (a negative ``percent``) removes the |k| largest singular triplets instead.  A convolution kernel keeps
``ceil(k / rf)`` per kernel position, as WeightWatcher does; a stack of experts is smoothed expert by expert.

By default the matrices smoothed are those WeightWatcher smooths: every weight matrix its layer filter keeps
(``min_evals`` 8, ``max_evals`` 15,000, ``max_N`` 50,000); ``include``/``exclude``/``kinds``/``layers`` narrow it.
WeightWatcher computes the truncation with scikit-learn's randomized ``TruncatedSVD`` on CPU; layerscope's is the
exact SVD in float64, cast back to the stored dtype, so the two agree to the randomized solver's accuracy.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from layerscope.adapters.rewrite import require_safetensors, write_like
from layerscope.checkpoint.reader import TensorInfo, open_checkpoint, read_tensor
from layerscope.errors import LayerscopeError
from layerscope.spectral import conv
from layerscope.spectral.scan import ScanOptions, scan_checkpoint

METHODS = {"svd": None, "detX": "detX_num", "alpha_min": "num_pl_spikes"}  # the column that gives k
ESTIMATORS = {"svd": ("alpha_hill",), "detX": ("alpha", "detx"), "alpha_min": ("alpha",)}  # svd: only M is read
# WeightWatcher smooths Linear, Embedding and convolution layers: every kind a scan analyses but weights of no
# Linear layer (an SSM's A_log)
DEFAULT_KINDS = ("projection", "expert", "grouped", "router", "embedding", "lm_head", "other", "norm", "conv")
WEIGHTWATCHER_FILTER = {"min_evals": 8, "max_evals": 15000, "max_n": 50000}
REPORT = "layerscope_smoothing.json"


def smooth(model: str | Path, out: str | Path, method: str = "detX", percent: float = 0.8, *,
           include: str | None = None, exclude: str | None = None, kinds: tuple[str, ...] = (),
           layers: tuple[int, ...] = (), device: str = "auto", progress: bool = True) -> pd.DataFrame:
    """Write ``model`` smoothed to ``out``; returns one row per smoothed matrix (``tensor``, ``name``, ``N``, ``M``,
    ``rf``, ``num_smooth``, ``kept``: the rank kept per matrix or kernel position, ``relative_change``:
    ‖W' − W‖_F / ‖W‖_F).  The same rows are written to ``out/layerscope_smoothing.json``."""
    if method not in METHODS:
        raise LayerscopeError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "svd" and not (-1 <= percent <= 1 and percent != 0):
        raise LayerscopeError(f"--percent {percent}: must be in [-1, 1] and not 0 (the share of eigenvalues kept; "
                              "negative removes the largest)")
    ckpt = open_checkpoint(model)
    require_safetensors(ckpt, "smooth")
    options = ScanOptions(estimators=ESTIMATORS[method], device=device, include=include, exclude=exclude,
                          kinds=tuple(kinds) or DEFAULT_KINDS, layers=tuple(layers), progress=progress,
                          **WEIGHTWATCHER_FILTER)
    rows = scan_checkpoint(ckpt, options)
    rows["rf"] = rows["rf"].fillna(1).astype(int) if "rf" in rows.columns else 1
    rows["groups"] = rows.groupby("tensor")["name"].transform("size")
    rows["num_smooth"] = [_num_smooth(row, method, percent) for row in rows.to_dict("records")]
    plan = rows[rows["num_smooth"] != 0]
    quantized = sorted(set(plan.loc[plan["quantization"].notna(), "tensor"]))
    if quantized:
        raise LayerscopeError(f"{ckpt.path}: {quantized[0]} is quantized; smoothing needs the weights themselves")
    changes: dict[str, float] = {}
    replacements = {tensor: partial(_smoothed, rows=group.to_dict("records"), changes=changes)
                    for tensor, group in plan.groupby("tensor", sort=False)}
    report = plan[["tensor", "name", "kind", "layer", "N", "M", "rf", "num_smooth"]].copy()
    report["kept"] = [_kept(row["num_smooth"], row["rf"], row["M"]) for row in plan.to_dict("records")]

    def report_bytes() -> bytes:  # written last, once every tensor's change is known
        report["relative_change"] = report["name"].map(changes)
        document = {"method": method, "percent": percent if method == "svd" else None, "source": str(ckpt.path),
                    "matrices": json.loads(report.to_json(orient="records"))}
        return json.dumps(document, indent=1).encode("utf-8")

    write_like(ckpt, Path(out), replacements, "smooth", progress, extra={REPORT: report_bytes})
    report["relative_change"] = report["name"].map(changes)
    return report.reset_index(drop=True)


def _num_smooth(row: dict, method: str, percent: float) -> int:
    """WeightWatcher's num_smooth for one row (0: leave it as it is, e.g. a failed fit)."""
    if method == "svd":
        return int(percent * row["M"] * row["rf"])
    value = row.get(METHODS[method])
    return int(value) if value is not None and not pd.isna(value) else 0


def _kept(num_smooth: int, rf: int, m: int) -> int:
    """The singular triplets kept per matrix (per kernel position); negative: the largest ones removed."""
    k = math.ceil(num_smooth / rf) if rf > 1 else num_smooth
    return max(-m, min(k, m))


def _smoothed(info: TensorInfo, rows: list[dict], changes: dict[str, float]) -> torch.Tensor:
    weight = read_tensor(info).to(torch.float64)
    new = weight.clone()
    for row in rows:
        before, target = _region(weight, row), _region(new, row)
        target[...] = after = _truncated(before, _kept(row["num_smooth"], row["rf"], row["M"]))
        norm = float(torch.linalg.vector_norm(before))
        changes[row["name"]] = float(torch.linalg.vector_norm(after - before)) / norm if norm > 0 else 0.0
    return new


def _region(tensor: torch.Tensor, row: dict) -> torch.Tensor:
    """The matrix one row is, as a view of its stored tensor (writing it writes the tensor): the tensor, one expert
    of a stack, one head group's rows, or a kernel's position matrices ``(rf, out, in)``."""
    if row["kind"] == "conv":
        return conv.kernel_matrices(tensor)
    if tensor.dim() > 2:
        return tensor.view(-1, *tensor.shape[-2:])[int(row["expert"])]
    part = row.get("part")
    if isinstance(part, str) and part.startswith("group."):
        size = tensor.shape[0] // int(row["groups"])
        g = int(part.split(".")[1])
        return tensor[g * size:(g + 1) * size]
    return tensor


def _truncated(matrices: torch.Tensor, k: int) -> torch.Tensor:
    """Each matrix of ``matrices`` (2-D, or a batch) with only its k largest singular triplets (k > 0), or without
    its |k| largest (k < 0)."""
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    s = s.clone()
    if k > 0:
        s[..., k:] = 0
    else:
        s[..., :-k] = 0
    return (u * s.unsqueeze(-2)) @ vh
