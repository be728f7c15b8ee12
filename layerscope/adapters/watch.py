"""Spectra while training: per-layer α of the chosen modules every N steps (TempBalance's view of training,
AlphaLoRA's premise that α tracks layer quality).

:class:`SpectraWatcher` is the plain hook for custom loops (``watcher.step(step)`` after the optimizer
step); :func:`spectra_callback` wraps it as a ``transformers.TrainerCallback``.  What is measured:

* a PEFT-wrapped model: its base weights once (step 0, kind ``projection`` …), then at every scan each
  LoRA module's ΔW = s·B·A (kind ``delta``, from the factors: cheap) and W + ΔW (kind ``merged``: a full
  eigendecomposition per module, most of the cost; ``merged=False`` leaves it out);
* any other model (full fine-tuning): the chosen weights themselves at every scan.

The training thread only copies what a scan needs (the LoRA factors, or the chosen weights) and goes on;
with ``background=True`` (default) the eigenvalues are computed on a worker thread while training continues,
and a scan still running when the next one is due is waited for (never two at once).  The table is tidy —
one row per (step, matrix): ``step``, ``name``, ``module``, ``layer``, ``role``, ``kind`` and the metrics —
and is rewritten atomically at ``out`` after every scan (.parquet or .csv), so a crash keeps what was
measured.  ``layerscope plot TABLE`` draws α over steps per layer.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from layerscope.adapters.incremental import MergedEigenvalues
from layerscope.adapters.memory import base_name, is_peft_model, peft_updates_in_memory
from layerscope.adapters.spectra import updates_table
from layerscope.adapters.updates import Update
from layerscope.checkpoint.memory import checkpoint_of_module
from layerscope.checkpoint.reader import Checkpoint
from layerscope.errors import LayerscopeError
from layerscope.spectral.scan import ScanOptions, scan_checkpoint

TRAINING_SPECTRA_SCHEMA = "layerscope.training-spectra/1"
KEPT_COLUMNS = ["step", "name", "module", "layer", "stack", "role", "kind", "shape", "alpha", "alpha_hill",
                "alpha_peak", "lambda_max", "log_norm", "log_spectral_norm", "stable_rank", "entropy", "status"]


class SpectraWatcher:
    """Scan ``model``'s chosen modules every ``every`` steps (see the module docstring).

    ``modules``: a regular expression over module names (default: every module of the model's blocks);
    ``estimators``: as for ``layerscope.scan`` (default ``alpha_hill``, no KS scan: cheap enough to run often);
    ``incremental``: how W + ΔW's eigenvalues are found — ``"always"`` from the base eigendecomposition kept at
    the first scan and the update's factors (:mod:`layerscope.adapters.incremental`), ``"never"`` with a full
    eigendecomposition, ``"auto"`` (default) whichever the measured cost model says is faster for the module's
    size and LoRA rank.
    """

    def __init__(self, model: torch.nn.Module, every: int = 100, out: str | Path | None = None,
                 modules: str | None = None, estimators: tuple[str, ...] = ("alpha_hill",),
                 background: bool = True, merged: bool = True, incremental: str = "auto"):
        if every < 1:
            raise LayerscopeError(f"every={every}: scan every 1 or more steps")
        if out is not None and Path(out).suffix not in (".parquet", ".csv"):
            raise LayerscopeError(f"out={out}: a training-spectra table is a .parquet or .csv file")
        try:
            self.pattern = re.compile(modules) if modules else None
        except re.error as exc:
            raise LayerscopeError(f"modules={modules!r}: invalid regular expression ({exc})") from None
        self.model, self.every, self.out = model, every, Path(out) if out is not None else None
        self.options = ScanOptions(estimators=tuple(estimators), progress=False, device="cpu")
        self.options.validate()
        self.peft = is_peft_model(model)
        self.merged = merged  # PEFT: also W + ΔW (a full eigendecomposition per module; ΔW alone is r × r)
        self.merged_source = MergedEigenvalues(incremental)  # W + ΔW from the kept base eigendecomposition
        self._frames: list[pd.DataFrame] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerscope-spectra") if background else None
        self._pending: Future | None = None
        self.scan_seconds = 0.0  # time spent computing spectra (on the worker thread when in the background)
        self.blocking_seconds = 0.0  # time the training thread spent in step(): copies, and waits for a busy worker
        self.scans = 0
        self._base_checkpoint = None
        self._model_layout: Checkpoint | None = None  # full fine-tuning: the live model's layout, for every scan
        if self.peft:
            base = model.get_base_model()
            self._base_checkpoint = checkpoint_of_module(base, "base model", base_name)
            self._record(0, scan_checkpoint(self._base_checkpoint, self.options), base_only=True)

    # ---- the hook
    def step(self, step: int, force: bool = False) -> None:
        """Call after each optimizer step; scans when ``step`` is a multiple of ``every`` (or ``force``)."""
        if not force and step % self.every:
            return
        started = time.perf_counter()
        if self._pending is not None:
            self._pending.result()  # never two scans at once; surfaces a failed scan here
        job = self._snapshot(step)
        if self._pool is None:
            job()
        else:
            self._pending = self._pool.submit(job)
        self.blocking_seconds += time.perf_counter() - started

    def close(self) -> pd.DataFrame:
        """Wait for a running scan, stop the worker, write the table; returns it."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._write()
        return self.table

    @property
    def table(self) -> pd.DataFrame:
        with self._lock:
            frames = list(self._frames)
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KEPT_COLUMNS)
        table.attrs.update(schema=TRAINING_SPECTRA_SCHEMA, every=self.every, peft=self.peft,
                           estimators=list(self.options.estimators), scans=self.scans,
                           scan_seconds=round(self.scan_seconds, 3), blocking_seconds=round(self.blocking_seconds, 3))
        return table

    # ---- internals
    def _snapshot(self, step: int):
        """Copy what the scan needs now (training goes on changing the weights); return the scan to run."""
        if self.peft:
            updates = [Update(u.module, u.expert, u.A.clone(), u.B.clone(), u.scaling, u.tensor, u.file, u.dtype)
                       for u in peft_updates_in_memory(self.model.get_base_model()) if self._chosen(u.module)]
            if not updates:
                raise LayerscopeError("no LoRA module matches modules=" + str(self.pattern.pattern if self.pattern else None))

            def job() -> None:
                base = self._base_checkpoint if self.merged else None
                self._timed(step, lambda: updates_table(updates, base, self.options.estimators, False,
                                                        self.merged_source))
            return job
        weights = {name: param.detach().to("cpu", copy=True) for name, param in self.model.named_parameters()
                   if param.dim() >= 2 and self._chosen(name.removesuffix(".weight"))}
        if not weights:
            raise LayerscopeError(f"no 2-D weight matches modules={self.pattern.pattern if self.pattern else None}")
        def job() -> None:
            self._timed(step, lambda: _weights_table(self._layout(), weights, self.options))
        return job

    def _layout(self) -> Checkpoint:
        """The model's checkpoint view (names, dtypes, module tree), built at the first scan and kept."""
        if self._model_layout is None:
            self._model_layout = checkpoint_of_module(self.model)
        return self._model_layout

    def _chosen(self, module: str) -> bool:
        return self.pattern is None or bool(self.pattern.search(module))

    def _timed(self, step: int, compute) -> None:
        started = time.perf_counter()
        table = compute()
        self.scan_seconds += time.perf_counter() - started
        self._record(step, table)

    def _record(self, step: int, table: pd.DataFrame, base_only: bool = False) -> None:
        table = table[table["layer"].notna()] if self.pattern is None else table[table["module"].astype(str).map(self._chosen)]
        frame = table.reindex(columns=KEPT_COLUMNS[1:]).assign(step=step)[KEPT_COLUMNS]
        with self._lock:
            self._frames.append(frame.reset_index(drop=True))
            if not base_only:
                self.scans += 1
        self._write()

    def _write(self) -> None:
        if self.out is None:
            return
        from layerscope.tables import atomic_write

        table = self.table
        if self.out.suffix == ".parquet":
            atomic_write(self.out, lambda tmp: table.to_parquet(tmp, index=False))
        else:
            atomic_write(self.out, lambda tmp: table.to_csv(tmp, index=False))


def _weights_table(layout: Checkpoint, weights: dict[str, torch.Tensor], options: ScanOptions) -> pd.DataFrame:
    """Scan copied weights under their names, with the live model's layout (tree: layers and roles)."""
    checkpoint = replace(layout, tensors={name: replace(info, value=weights[name])
                                          for name, info in layout.tensors.items() if name in weights})
    return scan_checkpoint(checkpoint, options)


def spectra_callback(every: int = 100, out: str | Path | None = None, modules: str | None = None,
                     estimators: tuple[str, ...] = ("alpha_hill",), background: bool = True, merged: bool = True,
                     incremental: str = "auto"):
    """A ``transformers.TrainerCallback`` that runs a :class:`SpectraWatcher` on the Trainer's model: a scan at
    the start, every ``every`` optimizer steps, and at the end of training; ``callback.watcher.table`` after."""
    from transformers import TrainerCallback

    class LayerscopeSpectraCallback(TrainerCallback):
        def __init__(self):
            self.watcher: SpectraWatcher | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.watcher = SpectraWatcher(model, every, out, modules, estimators, background, merged, incremental)
            self.watcher.step(state.global_step, force=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.watcher.step(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if state.global_step % every:
                self.watcher.step(state.global_step, force=True)
            self.watcher.close()

    return LayerscopeSpectraCallback()


__all__ = ["TRAINING_SPECTRA_SCHEMA", "SpectraWatcher", "spectra_callback"]
