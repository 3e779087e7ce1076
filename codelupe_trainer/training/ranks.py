"""Sums over the training ranks when a cycle trains on several processes (training/distributed.py)."""

from __future__ import annotations

import torch


def all_ranks_sum(value: float) -> float:
    """The sum over the training ranks (the value itself with one process): every rank must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return type(value)(total.item())


def world_size() -> int:
    """How many training ranks this cycle has (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
