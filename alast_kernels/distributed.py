"""What a per-step plan needs from ``torch.distributed``: the same plan on every rank.

Every rank measures its own block importances on its own batch; :func:`mean_over_ranks` averages them
before the budget update, and :func:`agree_on_seed` gives every rank rank 0's sampling seed, so every rank
makes the same plan at every step. :func:`check_wrapper` rejects data-parallel set-ups under which a
block frozen for one step could not work.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["active_group", "mean_over_ranks", "agree_on_seed", "check_wrapper"]


def active_group(group=None):
    """``group`` (default: the world) when ``torch.distributed`` is initialised with more than one rank,
    else ``None`` (nothing to agree on)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _device(group) -> torch.device:
    """Where the group's collectives take tensors: the CPU for gloo, the current GPU for NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "cpu" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def mean_over_ranks(values: Sequence[float], group) -> List[float]:
    """The element-wise mean of ``values`` over the ranks of ``group`` (float64, the same on every rank)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return (t / dist.get_world_size(group)).tolist()


def agree_on_seed(seed: int, group) -> int:
    """Rank 0's ``seed`` on every rank of ``group``."""
    t = torch.tensor([seed], dtype=torch.int64, device=_device(group))
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t.item())


def check_wrapper(model: nn.Module, method: str) -> None:
    """Raise when ``model`` is wrapped for data parallelism in a way a per-step frozen block breaks.

    A block frozen for a step gives its parameters no gradient: ``DistributedDataParallel`` needs
    ``find_unused_parameters=True`` to finish its gradient reduction without them (and cannot use
    ``static_graph=True``, since the unused set changes from step to step). FSDP2 (``fully_shard``) reduces
    gradients per sharded module and skips modules without any, so it works as is; the older
    ``FullyShardedDataParallel`` wrapper (flat parameters) is not supported.
    """
    from torch.nn.parallel import DistributedDataParallel

    for module in model.modules():
        if isinstance(module, DistributedDataParallel):
            if not module.find_unused_parameters or getattr(module, "static_graph", False):
                raise ValueError(
                    f"model: {method} freezes different blocks at different steps, so some parameters get no "
                    f"gradient in a step; wrap the model with DistributedDataParallel(model, "
                    f"find_unused_parameters=True) (and without static_graph=True)")
        if _is_fsdp1(module):
            raise NotImplementedError(
                f"model: {method} does not support FullyShardedDataParallel (FSDP1, flat parameters); use FSDP2 "
                f"(torch.distributed.fsdp.fully_shard on each block after ak.convert, then on the model) or "
                f"DistributedDataParallel(model, find_unused_parameters=True)")


def is_fsdp(module: nn.Module) -> bool:
    """``module`` was sharded by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(module, FSDPModule)


def _is_fsdp1(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return isinstance(module, FullyShardedDataParallel)
