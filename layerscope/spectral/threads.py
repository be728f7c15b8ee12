"""How many CPU threads a scan uses, and how: many small eigensolves side by side, or one big one at a time.

A Gram matrix a few hundred wide is too small for a multi-threaded LAPACK solve to pay: on 2 cores two
single-threaded solves of 384² matrices side by side take half the time of one two-threaded solve of
both (measured, benchmarks/RESULTS.md), and threads that wait at a barrier inside every small BLAS
call are what make a scan crawl on a machine that is busy with other work.  So:

* cores: the CPUs this process may run on (its affinity mask), divided among the ranks torchrun
  started on this node (``LOCAL_WORLD_SIZE``), at most ``OMP_NUM_THREADS`` when that is set; or
  ``LAYERSCOPE_THREADS`` / ``--threads`` when given.
* matrices up to ``SMALL_GRAM`` wide: one worker thread per core, each running torch with one thread.
* wider ones: one at a time, torch using every core.

The command line also sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) before torch starts,
so idle OpenMP threads sleep instead of spinning on cores other work needs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from layerscope.errors import LayerscopeError

ENV = "LAYERSCOPE_THREADS"
SMALL_GRAM = 1024  # widest Gram solved single-threaded, several side by side


@dataclass(frozen=True)
class ThreadPlan:
    workers: int  # matrices analysed side by side
    intra_op: int  # torch threads each one uses


def cores(requested: int | None = None) -> int:
    """Threads this process should use: ``requested``, else $LAYERSCOPE_THREADS, else its share of the CPUs."""
    if requested is None and os.environ.get(ENV):
        try:
            requested = int(os.environ[ENV])
        except ValueError:
            raise LayerscopeError(f"{ENV}={os.environ[ENV]!r} is not a whole number") from None
    if requested is not None:
        if requested < 1:
            raise LayerscopeError(f"--threads {requested}: must be >= 1 (or leave it out)")
        return requested
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    share = max(1, available // local_ranks)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(omp)) if omp.isdigit() and int(omp) > 0 else share  # the user's OpenMP cap, if set


def plan_for(width: int, count: int, total: int) -> ThreadPlan:
    """Workers and torch threads for a batch of ``count`` Gram matrices ``width`` wide, on ``total`` threads."""
    if width <= SMALL_GRAM and total > 1:
        return ThreadPlan(workers=total, intra_op=1)
    return ThreadPlan(workers=1, intra_op=total)


@contextmanager
def compute_threads(count: int):
    """torch's intra-op threads and the BLAS libraries' (scipy's OpenBLAS runs syrk) set to ``count`` for the
    block, restored after."""
    import torch

    previous = torch.get_num_threads()
    if previous != count:
        torch.set_num_threads(count)
    try:
        with _blas_controller().limit(limits=count, user_api="blas"):
            yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, found once (finding them scans every loaded library)."""
    import scipy.linalg.blas  # noqa: F401  (loads scipy's OpenBLAS, which runs syrk, before the scan)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def quiet_openmp() -> None:
    """Before torch is imported: idle OpenMP threads sleep rather than spin (the user's settings win)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
