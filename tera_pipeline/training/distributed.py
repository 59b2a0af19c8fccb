"""Data-parallel training processes: who this process is, its device, the process group.

``torchrun`` (or SLURM's ``srun`` with the same variables) starts one process per device and
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them this is the one
process of today's training. The group talks NCCL between GPUs, gloo between CPU processes.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes, ``local`` on its machine."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def env_ranks() -> Ranks:
    """The ranks ``torchrun`` set in the environment (one process when it set none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is not among WORLD_SIZE {world} processes")
    return Ranks(rank, world, local)


def device_for(ranks: Ranks) -> torch.device:
    """The process's GPU (its local rank's) where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", ranks.local % torch.cuda.device_count())
    return torch.device("cpu")


def join(ranks: Ranks, device: torch.device) -> None:
    """Join the group of ``ranks.world`` processes (MASTER_ADDR, MASTER_PORT from the
    environment) unless this process has, or is the only one. The group lasts as long as the
    process (left at exit): joining again on the same port races the first group's teardown."""
    if not ranks.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world)
    atexit.register(_leave)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, ranks: Ranks, find_unused: bool = False) -> torch.nn.Module:
    """``module`` in DistributedDataParallel (gradients averaged over the ranks by allreduce
    during backward) when there are several processes; ``module`` itself otherwise."""
    if not ranks.distributed:
        return module
    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def mean_over_ranks(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of ``values`` over the ranks (``values`` itself in one process)."""
    if not ranks.distributed:
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / ranks.world


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (nothing in one process)."""
    if ranks.distributed:
        dist.barrier()
