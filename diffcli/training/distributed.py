"""Processes under torchrun: which rank this is, its device, and the few collectives the loop needs."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from diffcli.device import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), device


@contextmanager
def process_group(device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """init_distributed for the length of a run; the process group is torn down however it ends."""
    d, device = init_distributed(device_name)
    try:
        yield d, device
        if d.active:  # let rank 0 finish writing before any rank tears the process group down
            import torch.distributed as dist

            dist.barrier()
    finally:
        if d.active:
            import torch.distributed as dist

            dist.destroy_process_group()


def all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank when flag is true on any: all ranks stop together when one received a signal."""
    if not d.active:
        return flag
    x = torch.tensor([1.0 if flag else 0.0], device=device)
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item() > 0)
