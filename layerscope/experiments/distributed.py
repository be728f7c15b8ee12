"""``compare-plans`` under torchrun: each rank trains a disjoint slice of the runs on its own device.

The run store under ``--out/runs`` is the only thing the ranks share (a shared filesystem): rank ``r`` of
``n`` trains jobs ``r, r + n, r + 2n, …`` of the same ordered list every rank builds, waits at a barrier
until all are stored, and reads the others' runs back.  Rank 0 writes the comparison.  A run's key does
not depend on the rank or device index, so a comparison resumed with another number of processes reuses
every stored run.  On GPUs rank ``r`` sees only GPU ``LOCAL_RANK``; the barriers go over gloo (no NCCL
needed, CPU runs work the same way), with a timeout long enough for a slice of runs that takes days.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.size == self.rank

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")
_hidden: dict[str, str] = {}


def join() -> World:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or a world of one.

    Each run is single-process training: once the barrier group is up, the launcher's variables are hidden
    from transformers/accelerate (which would otherwise wrap every run in DistributedDataParallel across the
    ranks, each training a different plan), and each rank sees only its own GPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    import torch
    import torch.distributed as dist

    _own_gpu(world.local_rank, torch)
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    for name in LAUNCHER_VARIABLES:
        if name in os.environ:
            _hidden[name] = os.environ.pop(name)
    _quiet_about_the_unused_group()
    return world


class _UnusedGroupFilter(logging.Filter):
    """transformers warns, once per run, that the process group is up but training is not DDP: here that is the
    design (the group only carries the barriers), so the warning would be noise in every rank's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "parallel_mode != ParallelMode.DISTRIBUTED" not in record.getMessage()


def _quiet_about_the_unused_group() -> None:
    logger = logging.getLogger("transformers.training_args")
    if not any(isinstance(f, _UnusedGroupFilter) for f in logger.filters):
        logger.addFilter(_UnusedGroupFilter())


def _own_gpu(local_rank: int, torch) -> None:
    """CUDA_VISIBLE_DEVICES narrowed to this rank's device (before CUDA starts), so "cuda" means it."""
    if torch.cuda.is_initialized():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else None
    if devices is None:
        if not torch.cuda.is_available():
            return
        devices = [str(i) for i in range(torch.cuda.device_count())]
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[local_rank % len(devices)]


def leave(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.update(_hidden)
        _hidden.clear()
