"""This process's place in the run: device, rank, world size, and the few collectives the loops
need to agree across processes. Plain torch.distributed: the process group itself is started by
the strategy (utils/strategy), the one place that talks to DeepSpeed."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def on_cuda() -> bool:
    return torch.cuda.is_available()


def current_device() -> torch.device:
    """This process's device (after the strategy has set the CUDA device)."""
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda() else torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if on_cuda():
        torch.cuda.manual_seed_all(seed)


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every process: decisions that lead to collectives (skip an
    update, save a checkpoint) must be the same everywhere."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=current_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag: bool) -> bool:
    return not all_ranks(not flag)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed element-wise over the processes, in place (returned for convenience)."""
    if world_size() > 1:
        dist.all_reduce(values)
    return values


def all_gather_cat(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's first dimension across processes (equal shapes: samplers pad)."""
    if world_size() == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)
