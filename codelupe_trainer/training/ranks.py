"""Sums and checks over the training ranks when a cycle trains on several processes (training/distributed.py)."""

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


def weights_fingerprint(model) -> float:
    """The sum of squares of the trainable weights, in float64: the same number on every rank when the
    ranks trained one model (DDP averages the gradients, so every rank takes the same optimizer steps)."""
    with torch.no_grad():
        return sum(float(parameter.detach().double().pow(2).sum()) for parameter in model.parameters()
                   if parameter.requires_grad)


def same_on_every_rank(value: float, relative_tolerance: float = 1e-6) -> bool:
    """Whether every rank holds this value (True with one process): every rank must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    extremes = torch.tensor([value, -value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        extremes = extremes.cuda()
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    largest, smallest = float(extremes[0]), -float(extremes[1])
    return largest - smallest <= relative_tolerance * max(abs(largest), abs(smallest), 1e-12)
