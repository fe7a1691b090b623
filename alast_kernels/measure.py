"""Measuring a training step the way docs/testing.md, "Measuring" asks: FLOPs, activation memory, wall time."""
from __future__ import annotations

import time
from typing import Callable, Iterable, List

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_flops", "saved_activation_bytes", "peak_cuda_memory", "median_seconds"]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# PyTorch's counter knows the CUDA attention kernels but not the CPU flash kernel SDPA dispatches to.
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


class _NoModuleTracking:
    """Stands in for ``FlopCounterMode``'s module tracker: all counts go to ``"Global"``, and no global module
    hooks are installed. With those hooks every module looks observed, so a :class:`~alast_kernels.ViTBlock`
    would call its modules instead of the fused ops (a class-token score would project every key): the count
    would be of another computation than the one that runs."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def count_flops(fn: Callable[[], object]) -> int:
    """Floating point operations of ``fn()`` as counted by ``torch.utils.flop_counter``: matmuls,
    convolutions and attention (the CPU flash-attention kernels included), of the code that runs when
    nothing observes the modules (no per-module breakdown)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return int(counter.get_total_flops())


def saved_activation_bytes(fn: Callable[[], object], parameters: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, each storage counted once.

    Storages of ``parameters`` (weights saved by linear layers) are not activations and are not counted.
    ``fn`` should run the forward pass only; the saved tensors are released when its result is dropped.

    The hook saves a detached alias of each tensor, not the tensor itself: a node's own output saved as
    itself would hold the node through its ``grad_fn`` (a reference cycle), keeping the whole measured graph
    alive until a cyclic garbage collection.
    """
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    seen = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return int(sum(seen.values()))


def peak_cuda_memory(fn: Callable[[], object], device=None) -> int:
    """Rise of ``torch.cuda.max_memory_allocated`` over ``fn()``, in bytes."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _synchronize() -> None:
    """Wait for the GPU work queued so far (nothing to wait for where CUDA was never initialised)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(fns: List[Callable[[], object]], repeats: int = 5, warmup: int = 1, inner: int = 1) -> List[float]:
    """Median wall time of one call of each callable, the variants interleaved round by round after
    ``warmup`` rounds.

    Each timing covers ``inner`` back-to-back calls (and is divided by ``inner``) and starts and ends with
    a CUDA synchronisation, so on a GPU it measures the work the calls queue, not only their launches; the
    synchronisations are no-ops where CUDA is not in use. The one timing helper of the benchmarks.
    """
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        for i, fn in enumerate(fns):
            _synchronize()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _synchronize()
            if r >= warmup:
                times[i].append((time.perf_counter() - start) / inner)
    return [sorted(t)[len(t) // 2] for t in times]
