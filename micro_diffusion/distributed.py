"""This process's place in a job started by a launcher (`composer -n N`, torchrun): rank, world size, collectives.

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the process is a job
of one and no process group is made. Collectives run over gloo on CPU tensors and picklable objects, whatever
device the work itself runs on: what is exchanged here (counts, feature statistics) is small next to the work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """This process's place in the job; owns the process group when it created it."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False

    def shard(self, count: int) -> range:
        """The indices of [0, count) this process takes: rank, rank + world_size, ... (disjoint, covering)."""
        return range(self.rank, count, self.world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def reduce(self, value: float, op: dist.ReduceOp.RedOpType) -> float:
        """`value` reduced over all processes with `op` (SUM, MAX)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's `value` (picklable), in rank order, on rank 0; None on the other ranks."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def close(self) -> None:
        self.barrier()
        if self.owns_group:
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> Distributed:
    """Rank and world size from the launcher's environment, a gloo process group when there are several
    processes, and the device: `device`, or cuda:LOCAL_RANK when CUDA is available, else cpu."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="gloo")
    if device is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return Distributed(rank, world_size, torch.device(device), owns_group)
