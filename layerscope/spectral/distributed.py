"""Scans split across processes with torch.distributed (``torchrun --nproc-per-node N -m layerscope scan``).

Every rank reads the headers and makes the same list of tensors to analyse.  The tensors are then
shared out by estimated cost — Gram (2·N·M² flops) plus eigensolve (≈ 9·M³) per matrix — with the
longest-first greedy rule, so the ranks finish close together; each rank reads and analyses only
its own share.  The rows are gathered on every rank and put back in the single-process order, so
the table is the same as a one-process scan's.  Rank 0 alone writes the outputs.

Failure is collective: whatever a rank raises is gathered, and every rank stops with the first
failing rank's message (``rank 1: ...``), so nothing is written.  Objects travel over a gloo group
even when the tensors' backend is nccl.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from layerscope.errors import LayerscopeError


@dataclass
class Group:
    rank: int
    size: int
    local_rank: int
    _objects: object  # the gloo process group objects travel on

    def share(self, costs: list[float]) -> list[int]:
        """Indices of the items this rank analyses (longest-processing-time-first assignment)."""
        loads = [(0.0, r) for r in range(self.size)]
        owner = [0] * len(costs)
        for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, rank = heapq.heappop(loads)
            owner[index] = rank
            heapq.heappush(loads, (load + costs[index], rank))
        return [i for i, r in enumerate(owner) if r == self.rank]

    def run(self, work: Callable[[], object]) -> list[object]:
        """Run ``work`` on every rank; return every rank's result, or raise the first rank's error everywhere."""
        error, result = None, None
        try:
            result = work()
        except LayerscopeError as exc:
            error = str(exc)
        except Exception as exc:  # a bug on one rank must not leave the others waiting
            error = f"{type(exc).__name__}: {exc}"
        gathered: list = [None] * self.size
        torch.distributed.all_gather_object(gathered, (error, result), group=self._objects)
        for rank, (failure, _) in enumerate(gathered):
            if failure is not None:
                raise LayerscopeError(f"rank {rank}: {failure}")
        return [payload for _, payload in gathered]

    def guard(self, work: Callable[[], object]) -> object:
        """Run ``work`` on every rank and keep each rank's own result; a failure on any rank becomes the
        same one-line ``rank N: ...`` error everywhere (printed once, by rank 0), not one error per rank."""
        kept = {}

        def local():
            kept["value"] = work()

        self.run(local)
        return kept["value"]


_GROUP: Group | None = None


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LayerscopeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def current(device: str = "auto") -> Group | None:
    """The process group of a torchrun launch (initialised once), or None in a single process."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    if world_size_from_env() <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise LayerscopeError("this torch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
        except (RuntimeError, ValueError) as exc:
            raise LayerscopeError(f"torch.distributed could not start ({str(exc).splitlines()[0]}); launch with "
                                  "torchrun, which sets RANK, WORLD_SIZE and MASTER_ADDR") from None
    objects = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    _GROUP = Group(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, _objects=objects)
    return _GROUP


def rank_device(device: str, group: Group | None) -> str:
    """Under torchrun, ``cuda`` / ``auto`` with GPUs mean this rank's local GPU."""
    if group is None:
        return device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{group.local_rank}"
    return device


def matrix_cost(shape: tuple[int, ...]) -> float:
    """Estimated flops of one tensor's analysis: Gram plus eigensolve per matrix."""
    if len(shape) < 2:
        return 0.0
    count = 1
    for dim in shape[:-2]:
        count *= dim
    n, m = max(shape[-2:]), min(shape[-2:])
    return count * (2.0 * n * m * m + 9.0 * m ** 3)
