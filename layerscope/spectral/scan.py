"""Scan a checkpoint: one row of spectral metrics per matrix, one tensor in memory at a time."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from layerscope.checkpoint.fusion import expert_parameters
from layerscope.checkpoint.modeltree import TABLE_VERIFIED, model_facts, tree_for_checkpoint
from layerscope.checkpoint.naming import TARGET_KINDS, NamingScheme, TensorRole, detect_scheme, scheme_by_name
from layerscope.checkpoint.quantization import LogicalTensor, load_logical, logical_tensors
from layerscope.checkpoint.quantization.logical import load_stack
from layerscope.checkpoint.reader import Checkpoint, open_checkpoint
from layerscope.checkpoint.shapecheck import check_shapes, has_block_gaps, tree_gaps
from layerscope.errors import LayerscopeError
from layerscope.spectral import distributed, esd, threads
from layerscope.spectral.analysis import Matrix, RowOptions, analyse_batch
from layerscope.spectral.cache import ScanCache
from layerscope.spectral.columns import layer_summary, scan_columns
from layerscope.spectral.coverage import config_depth, described, listed_once, not_analysed, wanted
from layerscope.spectral.matrices import identity, matrix_count, tensor_matrices
from layerscope.spectral.options import ScanOptions

__all__ = ["ScanOptions", "layer_summary", "scan", "scan_checkpoint"]
from layerscope.tables import integer_columns

# Matrices of one shape are stacked into batches up to this many bytes (stored weights plus
# their Gram matrices in the working dtype).
# Batching pays on GPUs; on CPU it buys little, so memory wins there.
DEFAULT_BATCH_BYTES = {"cpu": 32 << 20, "cuda": 1 << 30}


@dataclass
class _Batch:
    key: tuple | None = None  # (shape, stored dtype): what can be stacked
    items: list[Matrix] = field(default_factory=list)
    nbytes: int = 0


def scan(path: str | Path, **options) -> pd.DataFrame:
    """Per-matrix spectral metrics of a checkpoint folder or ``.safetensors`` file.

    Keyword options are the fields of :class:`ScanOptions`.  Model facts (architecture,
    layer count, header fingerprint, naming scheme) are in ``df.attrs``; see
    :func:`layer_summary` for the per-layer table.
    """
    opts = ScanOptions(**options)
    opts.validate()  # option errors before any file is opened
    if opts.base is not None:
        raise LayerscopeError(f"--base applies to adapter folders; {path} is not one (use layerscope.scan)")
    group = distributed.current(opts.device)
    if group is None:
        return scan_checkpoint(open_checkpoint(path, opts.revision), opts)
    return scan_checkpoint(group.guard(lambda: open_checkpoint(path, opts.revision)), opts)


def scan_checkpoint(ckpt: Checkpoint, opts: ScanOptions) -> pd.DataFrame:
    opts.validate()
    logical = logical_tensors(ckpt)
    names = [t.name for t in logical]
    if ckpt.tree is not None:  # a model in memory is its own module tree
        tree, no_tree = ckpt.tree, None
    else:
        tree, no_tree = (tree_for_checkpoint(ckpt.config, ckpt.path) if opts.live_names
                         else (None, "--no-live-names"))
    scheme = (scheme_by_name(opts.architecture, ckpt.config, names, tree) if opts.architecture
              else detect_scheme(ckpt.config, names, tree))
    device = esd.resolve_device(distributed.rank_device(opts.device, distributed.current(opts.device)))
    dtype = esd.working_dtype(opts.precision, device)
    classified = [(t, scheme.classify(t.name, t.shape, t.analysable_dtype)) for t in logical]
    absent_blocks, blocks_present = config_depth(ckpt, classified)
    missing = list(ckpt.missing)  # a GGUF file's, against the model its metadata builds
    if ckpt.files:  # a model in memory is its own architecture
        missing = listed_once(missing, check_shapes(ckpt.path, ckpt.config, classified, tree), absent_blocks)
        if tree is None and no_tree == TABLE_VERIFIED and has_block_gaps(classified):
            built, _ = tree_for_checkpoint(ckpt.config, ckpt.path, force=True)  # let the architecture decide
            if built is not None:
                missing = listed_once(missing, tree_gaps(classified, built))
    selection = opts.selection()
    selected = [(info, role) for info, role in classified if wanted(info, role, selection)]
    if not selected:
        raise LayerscopeError(f"{ckpt.path}: no weight matrix to analyse"
                              + (" (the selection options left none)" if selection.narrowed else ""))
    if opts.describe:
        return _described(ckpt, scheme, tree, selected, classified, selection, missing, opts.pool)
    group = distributed.current(opts.device)
    mine = list(range(len(selected))) if group is None else group.share(
        [distributed.matrix_cost(info.shape) for info, _ in selected])
    work = _RankWork(ckpt, selected, mine, scheme, opts, device, dtype)
    outcomes = [work()] if group is None else group.run(work)
    results: dict[int, list[dict]] = {}
    for rank_results, _, _ in outcomes:
        results.update(rank_results)
    reused = sum(count for _, count, _ in outcomes)
    rows = [row for index in range(len(selected)) for row in results[index]]

    columns = scan_columns(opts.estimators, opts.fix_fingers is not None, kernels=any("rf" in row for row in rows))
    table = integer_columns(pd.DataFrame(rows, columns=columns))
    _require_layer_matrices(ckpt, table, opts)
    parameters = expert_parameters(ckpt, tree, selected)
    if parameters:
        table["parameter"] = table["tensor"].map(parameters).where(table["kind"] == "expert")
    table.attrs.update(
        path=str(ckpt.path) if not ckpt.files else str(Path(ckpt.path).resolve()),  # valid from any folder
        architecture=ckpt.architecture,
        model_type=ckpt.config.get("model_type"),
        **model_facts(scheme, tree, ckpt.config),
        live_names=tree is not None or no_tree == TABLE_VERIFIED,
        live_names_note=no_tree,
        unmapped=sorted({str(r.module) for _, r in classified if r.kind == "other" and r.layer is not None}),
        not_analysed=not_analysed(classified, selection),
        missing=missing,
        quantization=sorted({t.quantization for t in logical if t.quantization}),
        num_layers=blocks_present or max(filter(None, (scheme.num_layers or ckpt.num_layers, _layers_seen(table))),
                                         default=None),
        config_num_layers=scheme.num_layers or ckpt.num_layers if blocks_present else None,
        fingerprint=ckpt.fingerprint(),
        estimators=list(opts.estimators),
        device=str(device),
        precision=opts.precision,
        working_dtype=str(dtype).removeprefix("torch."),  # what --precision auto chose on this device
    )
    if opts.cache:  # how this run went, not what the model is: never written to the output files
        table.attrs["cache"] = {"folder": str(opts.cache), "reused": reused, "computed": len(selected) - reused}
    if group is not None:  # per rank: its share, time and peak memory (an unbalanced share shows here)
        table.attrs["ranks"] = [share for _, _, share in outcomes]
    return table


def _described(ckpt: Checkpoint, scheme: NamingScheme, tree, selected, classified, selection, missing,
               pool: bool) -> pd.DataFrame:
    """``describe``: the rows without their numbers (see layerscope.spectral.coverage.described)."""
    table = integer_columns(pd.DataFrame(described(selected, pool)))
    table.attrs.update(path=str(ckpt.path), architecture=ckpt.architecture, model_type=ckpt.config.get("model_type"),
                       **model_facts(scheme, tree, ckpt.config), not_analysed=not_analysed(classified, selection),
                       missing=missing, described=True)
    return table


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: the accelerator's allocator on CUDA, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class _RankWork:
    """Analyse the ``mine`` share of the selected tensors: (rows per selected index, tensors reused from the cache)."""

    ckpt: Checkpoint
    selected: list[tuple[LogicalTensor, TensorRole]]
    mine: list[int]
    scheme: NamingScheme
    opts: ScanOptions
    device: torch.device
    dtype: torch.dtype

    def __call__(self) -> tuple[dict[int, list[dict]], int, dict]:
        started = time.perf_counter()
        opts, device, dtype = self.opts, self.device, self.dtype
        total = sum(matrix_count(*self.selected[i], self.scheme, opts.pool) for i in self.mine)
        batch_bytes = opts.batch_bytes if opts.batch_bytes is not None else DEFAULT_BATCH_BYTES.get(device.type,
                                                                                                   32 << 20)
        if device.type == "cpu":  # batches run side by side: the budget is for all of them together
            batch_bytes = max(1, batch_bytes // threads.cores(opts.threads))
        cache = ScanCache(opts.cache, _cache_settings(opts, device, dtype)) if opts.cache else None
        progress = _Progress(len(self.selected), cache)
        batch = _Batch()
        show = opts.progress and _is_rank0()
        analyser = None
        try:
            with tqdm(total=total, unit="matrix", desc="scan", disable=(not show) or None) as bar:
                analyser = _Analyser(device, dtype, opts.estimators, bar, progress, threads.cores(opts.threads),
                                     opts.row_options())
                to_compute = []
                for index in self.mine:
                    info, role = self.selected[index]
                    key = cache.key(list(info.parts.values()), identity(info, role), info.quantization) if cache else None
                    cached = cache.get(key) if cache else None
                    if cached is not None:
                        progress.results[index] = cached
                        bar.update(len(cached))
                    else:
                        to_compute.append((index, key, info, role))
                reads = _prefetched(self.ckpt, [(i, r) for _, _, i, r in to_compute])
                for index, key, info, role in to_compute:  # not zip: its reused tuple holds the last tensor
                    weight = next(reads)  # while the next one is read
                    progress.keys[index] = key
                    count = 0
                    for matrix in tensor_matrices(self.ckpt, info, role, weight, self.scheme, opts):
                        matrix.owner = index
                        count += 1
                        shape_key = (tuple(matrix.weight.shape), matrix.weight.dtype)
                        if batch.items and shape_key != batch.key:
                            analyser.submit(batch.items)
                            batch = _Batch()
                        batch.key = shape_key
                        batch.items.append(matrix)
                        batch.nbytes += _working_bytes(matrix.weight, dtype)
                        if batch.nbytes >= batch_bytes:  # full: analysed now, before the next tensor is read
                            analyser.submit(batch.items)
                            batch = _Batch()
                    progress.expect(index, count)
                    weight = matrix = None  # not held while the next tensor is read
                if batch.items:
                    analyser.submit(batch.items)
                analyser.drain()
        finally:
            if analyser is not None:
                analyser.close()
            if cache:
                cache.close()
        share = {"rank": int(os.environ.get("RANK", "0")), "matrices": total,
                 "seconds": round(time.perf_counter() - started, 3), "peak_mib": peak_memory_mib(device),
                 "threads": threads.cores(opts.threads) if device.type == "cpu" else 1}
        return {i: progress.results[i] for i in self.mine}, len(self.mine) - len(to_compute), share


class _Analyser:
    """Analyses batches as they fill.  On CPU, batches of small Gram matrices run on worker threads side by
    side with torch single-threaded; a wide one runs here with every thread (see layerscope.spectral.threads).
    Rows are collected here, in submission order, so the cache and the table see one writer."""

    def __init__(self, device: torch.device, dtype: torch.dtype, estimators: tuple[str, ...], bar: tqdm,
                 progress: _Progress, total_threads: int, options: RowOptions):
        self.device, self.dtype, self.estimators, self.bar, self.progress = device, dtype, estimators, bar, progress
        self.options = options
        self.total = total_threads
        parallel = device.type == "cpu" and total_threads > 1
        self.pool = ThreadPoolExecutor(total_threads, thread_name_prefix="layerscope-esd") if parallel else None
        self.inflight: deque = deque()
        self.single = None  # the single-threaded setting while batches run side by side

    def submit(self, items: list[Matrix]) -> None:
        plan = threads.plan_for(min(items[0].weight.shape[-2:]), len(items), self.total)
        stored = sum(m.weight.numel() * m.weight.element_size() for m in items)
        if self.pool is None or plan.workers == 1 or stored > PREFETCH_LIMIT_BYTES:  # a large one is never in flight
            self.drain()
            count = plan.intra_op if self.device.type == "cpu" else torch.get_num_threads()
            with threads.compute_threads(count):
                self.progress.collect(items, analyse_batch(items, self.device, self.dtype, self.estimators, self.bar,
                                                           self.options))
            return
        if self.single is None:
            self.single = threads.compute_threads(1)
            self.single.__enter__()
        self.inflight.append((items, self.pool.submit(_analysed_and_released, items, self.device, self.dtype,
                                                      self.estimators, self.bar, self.options)))
        # Bounded: one running batch per worker holds weights.  A finished batch holds only its rows, so a
        # long one at the head (a word embedding's Gram) does not idle the other workers while it runs.
        while sum(not future.done() for _, future in self.inflight) > plan.workers:
            wait([future for _, future in self.inflight if not future.done()], return_when=FIRST_COMPLETED)
        while self.inflight and self.inflight[0][1].done():  # rows are collected in submission order
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        items, future = self.inflight.popleft()
        self.progress.collect(items, future.result())

    def drain(self) -> None:
        try:
            while self.inflight:
                self._collect_oldest()
        finally:
            self._leave_single()

    def _leave_single(self) -> None:
        if self.single is not None:
            single, self.single = self.single, None
            single.__exit__(None, None, None)

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self._leave_single()


def _analysed_and_released(items: list[Matrix], *args) -> list[dict]:
    """A worker's batch: its rows, with the weights let go as soon as they are analysed."""
    rows = analyse_batch(items, *args)
    for matrix in items:
        matrix.weight = None
    return rows


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _require_layer_matrices(ckpt: Checkpoint, table: pd.DataFrame, opts: ScanOptions) -> None:
    """A scan whose layer table would be empty is an error, not an empty success."""
    if opts.selection().narrowed or not ckpt.files:
        return  # the user narrowed the scan on purpose, or passed a module in memory (any layout is welcome)
    targets = table[table["kind"].isin(TARGET_KINDS) & table["layer"].notna()]
    if targets.empty and (table[table["kind"] == "conv"]["status"] == "ok").any():
        return  # a convolutional network: its kernels are its matrices
    if targets.empty:
        raise LayerscopeError(f"{ckpt.path}: no projection or expert matrix inside the model's blocks was found "
                              "(unknown layout? try --architecture)")
    if (targets["status"] != "ok").all():
        raise LayerscopeError(f"{ckpt.path}: no matrix inside the model's blocks could be analysed (statuses: "
                              f"{', '.join(sorted(set(targets['status'])))})")


class _Progress:
    """Rows per selected tensor, in selection order; a tensor's rows go to the cache once all are in."""

    def __init__(self, count: int, cache: ScanCache | None):
        self.results: list[list[dict] | None] = [None] * count
        self.keys: dict[int, str | None] = {}
        self._expected: dict[int, int] = {}
        self._cache = cache

    def collect(self, matrices: list[Matrix], rows: list[dict]) -> None:
        for matrix, row in zip(matrices, rows):
            if self.results[matrix.owner] is None:
                self.results[matrix.owner] = []
            self.results[matrix.owner].append(row)
            self._maybe_store(matrix.owner)

    def expect(self, index: int, count: int) -> None:
        self._expected[index] = count
        if self.results[index] is None and count == 0:
            self.results[index] = []
        self._maybe_store(index)

    def _maybe_store(self, index: int) -> None:
        done = self.results[index] or []
        if self._cache and self._expected.get(index) == len(done) and self.keys.get(index):
            self._cache.put(self.keys.pop(index), done)


def _cache_settings(opts: ScanOptions, device: torch.device, dtype: torch.dtype) -> dict:
    return {"estimators": list(opts.estimators), "precision": opts.precision, "dtype": str(dtype),
            "device": device.type, "split_fused": opts.split_fused,
            **({"pool": False} if not opts.pool else {}), **({"conv2d_norm": False} if not opts.conv2d_norm else {}),
            **({"tolerance": opts.tolerance} if "rank" in opts.estimators else {}),
            **({"fingers": [opts.fix_fingers, opts.max_fingers, opts.finger_thresh]} if opts.fix_fingers else {}),
            **({"xmax": opts.xmax} if opts.xmax else {}), **({"xmin_max": opts.xmin_max} if opts.xmin_max else {})}


PREFETCH_LIMIT_BYTES = 256 << 20


def _prefetched(ckpt: Checkpoint, selected: list[tuple[LogicalTensor, TensorRole]]
                ) -> Iterator[torch.Tensor]:
    """Each selected tensor with its weights, the next one read from disk while this one is analysed.

    Reading releases the GIL, so disk time hides behind eigensolver time; at most two tensors
    are in memory at once, and only one when either is larger than ``PREFETCH_LIMIT_BYTES`` (two
    201,088-row embeddings would double the peak for a read that takes a fraction of their analysis).
    """
    def load(item: tuple[LogicalTensor, TensorRole]):
        info, role = item
        return load_stack(ckpt, info) if role.kind == "expert_stack" else load_logical(ckpt, info)

    def large(item: tuple[LogicalTensor, TensorRole]) -> bool:
        return sum(part.nbytes for part in item[0].parts.values()) > PREFETCH_LIMIT_BYTES

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerscope-read") as reader:
        pending = reader.submit(load, selected[0]) if selected else None
        for k in range(len(selected)):
            weight = pending.result() if pending is not None else load(selected[k])
            ahead = k + 1 < len(selected) and not (large(selected[k]) or large(selected[k + 1]))
            pending = reader.submit(load, selected[k + 1]) if ahead else None
            yield weight
            del weight


def _working_bytes(weight: torch.Tensor, dtype: torch.dtype) -> int:
    """What one matrix costs in a batch: its stored bytes plus its Gram and the eigensolver's copy."""
    m = min(weight.shape)
    return weight.numel() * weight.element_size() + 2 * m * m * torch.finfo(dtype).bits // 8


def _layers_seen(table: pd.DataFrame) -> int | None:
    layers = table["layer"].dropna()
    return int(layers.max()) + 1 if len(layers) else None
