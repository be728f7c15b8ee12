"""The options of a scan: the keyword arguments of ``layerscope.scan`` and the flags of ``layerscope scan``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.spectral import esd
from layerscope.spectral.analysis import RowOptions
from layerscope.spectral.columns import ALL_ESTIMATORS
from layerscope.spectral.coverage import Selection
from layerscope.spectral.fingers import DEFAULT_FINGER_THRESH, DEFAULT_MAX_FINGERS, FIX_FINGERS
from layerscope.spectral.rank import WEAK_RANK_TOLERANCE


@dataclass(frozen=True)
class ScanOptions:
    """The options of a scan: the keyword arguments of ``layerscope.scan`` and the flags of ``layerscope scan``."""

    estimators: tuple[str, ...] = ("alpha", "alpha_hill", "alpha_peak")
    """Estimators per matrix: ``alpha`` (WeightWatcher's KS-chosen power-law fit), ``alpha_hill`` (PL_Alpha_Hill,
    AlphaLoRA's layer quality), ``alpha_peak``, and those that need the matrix itself: ``alpha_farms``, ``mp``
    (the Marchenko–Pastur fit), ``rand`` (the randomized ESD) and ``rank`` (matrix_rank, rank_loss, weak_rank_loss,
    sv_max, sv_min from an SVD)."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = "auto"
    """``auto`` (float64 where the device runs it at full rate: CPUs, H100/H200; else float32 with a conditioning
    guard), ``f64`` or ``f32``."""
    include: str | None = None
    """Regular expression: analyse only the tensors whose names match."""
    exclude: str | None = None
    """Regular expression: leave out the tensors whose names match."""
    split_fused: bool = False
    """Analyse fused projections (q|k|v, gate|up) part by part instead of as one matrix."""
    architecture: str | None = None
    """A naming-table entry to use instead of the one detected from config.json (``layerscope architectures``)."""
    revision: str | None = None
    """The snapshot to read when the path is a Hugging Face hub cache folder (``models--org--name``)."""
    batch_bytes: int | None = None
    """Bytes of matrices analysed in one batched call (None: the device's default)."""
    progress: bool = True
    """A progress bar on stderr (shown on terminals)."""
    cache: str | Path | None = None
    """A folder where each finished tensor's rows are kept, so an interrupted scan resumes."""
    base: str | Path | None = None
    """Adapter folders only: also analyse W + ΔW of this base model."""
    live_names: bool = True
    """Name modules as the model transformers builds has them (when it can build it)."""
    threads: int | None = None
    """CPU threads (default: ``$LAYERSCOPE_THREADS``, else this process's share of the cores)."""
    tolerance: float = WEAK_RANK_TOLERANCE
    """The ``rank`` estimator: ``weak_rank_loss`` counts the eigenvalues σ² below it (WeightWatcher's default)."""
    kinds: tuple[str, ...] = ()
    """Analyse only rows of these kinds (``projection``, ``expert``, ``embedding``, ``lm_head``, ``router`` …)."""
    roles: tuple[str, ...] = ()
    """Analyse only these roles (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down`` …)."""
    layers: tuple[int, ...] = ()
    """Analyse only the matrices of these blocks (depth order, as the ``layer`` column)."""
    min_evals: int | None = None
    """Leave out matrices with fewer eigenvalues (the smaller side) than this (WeightWatcher's ``min_evals``)."""
    max_evals: int | None = None
    """Leave out matrices with more eigenvalues than this (WeightWatcher's ``max_evals``)."""
    max_n: int | None = None
    """Leave out matrices whose larger side exceeds this (WeightWatcher's ``max_N``, 50,000 there by default)."""
    fix_fingers: str | None = None
    """``clip_xmax``: WeightWatcher's finger fix — ``alpha`` is the fit with up to ``max_fingers`` of the largest
    eigenvalues clipped off, ``raw_alpha`` the unclipped fit, ``num_fingers`` how many (layerscope.spectral.fingers)."""
    max_fingers: int = DEFAULT_MAX_FINGERS
    """With ``fix_fingers``: the most eigenvalues clipped (WeightWatcher's default 10)."""
    finger_thresh: float = DEFAULT_FINGER_THRESH
    """With ``fix_fingers``: how far α must drop below the raw fit for a clipped fit to be taken."""
    xmax: int | None = None
    """WeightWatcher's integer ``xmax``: the ``alpha`` fit leaves out this many of the largest eigenvalues (at most
    half of them); the norm metrics keep every eigenvalue."""
    xmin_max: float | None = None
    """WeightWatcher's ``xmin_max``: the top of ``alpha_peak``'s xmin window, in raw eigenvalue units (default
    1.5 × the ESD's peak)."""
    pool: bool = True
    """A convolution kernel is one row, its kernel positions' eigenvalues pooled into one ESD (WeightWatcher's
    ``pool=True``); False: one row per position (``name[i,j]``)."""
    conv2d_norm: bool = True
    """WeightWatcher's ``conv2d_norm``: a Conv2d's eigenvalues are scaled by 1/2 pooled, rf/2 per position."""
    describe: bool = False
    """List the matrices the scan would analyse (name, kind, layer, role, shape, N, M) and compute nothing."""

    def row_options(self) -> RowOptions:
        return RowOptions(self.tolerance, self.fix_fingers, self.max_fingers, self.finger_thresh, self.xmax,
                          self.xmin_max)

    def selection(self) -> Selection:
        return Selection(self.include, self.exclude, tuple(self.kinds), tuple(self.roles),
                         tuple(int(layer) for layer in self.layers), self.min_evals, self.max_evals, self.max_n,
                         self.pool)

    def validate(self) -> None:
        esd.check_precision(self.precision)
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise LayerscopeError(f"--tolerance {self.tolerance}: must be a finite number > 0")
        unknown = [e for e in self.estimators if e not in ALL_ESTIMATORS]
        if unknown or not self.estimators:
            raise LayerscopeError(f"--estimators: unknown {', '.join(unknown)} (known: {', '.join(ALL_ESTIMATORS)})"
                                  if unknown else f"--estimators: give one or more of {', '.join(ALL_ESTIMATORS)}")
        if "vectors" in self.estimators and "alpha" not in self.estimators:
            raise LayerscopeError("--estimators vectors splits the eigenvectors into bulk and tail at alpha's xmin; "
                                  "add alpha")
        if self.fix_fingers is not None and self.fix_fingers not in FIX_FINGERS:
            raise LayerscopeError(f"--fix-fingers {self.fix_fingers!r}: expected one of {', '.join(FIX_FINGERS)}")
        if type(self.max_fingers) is not int or self.max_fingers < 3:
            raise LayerscopeError(f"--max-fingers {self.max_fingers}: must be a whole number >= 3 (clipping starts at 2)")
        if not (self.finger_thresh > 0 and math.isfinite(self.finger_thresh)):
            raise LayerscopeError(f"--finger-thresh {self.finger_thresh}: must be a finite number > 0")
        if self.xmax is not None and (type(self.xmax) is not int or self.xmax < 1):
            raise LayerscopeError(f"--xmax {self.xmax}: must be a whole number >= 1 (the largest eigenvalues to leave "
                                  "out of the alpha fit)")
        if self.xmin_max is not None and not (self.xmin_max > 0 and math.isfinite(self.xmin_max)):
            raise LayerscopeError(f"--xmin-max {self.xmin_max}: must be a finite number > 0")
        for flag, value in (("--min-evals", self.min_evals), ("--max-evals", self.max_evals), ("--max-n", self.max_n)):
            if value is not None and (type(value) is not int or value < 1):
                raise LayerscopeError(f"{flag} {value}: must be a whole number >= 1")
        for flag, rx in (("--include", self.include), ("--exclude", self.exclude)):
            if rx is not None:
                try:
                    re.compile(rx)
                except re.error as exc:
                    raise LayerscopeError(f"{flag} {rx!r}: invalid regular expression ({exc})") from None
