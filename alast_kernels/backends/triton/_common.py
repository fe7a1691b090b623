"""Helpers shared by the Triton launchers: output allocation, launch settings, the device guard."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton


def interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised memory for a kernel to write in full.

    Every output a launcher allocates comes from here, so tests can substitute a NaN-filled allocation
    and prove that the kernels write every element.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def row_block(n: int) -> int:
    """Power-of-two block covering ``n`` elements of a row (at least 16, Triton's smallest dot tile)."""
    return max(16, triton.next_power_of_2(n))


def num_warps(tile_elements: int, per_thread: int) -> int:
    """Warps for a program whose tile has ``tile_elements`` and whose threads should each hold at most
    ``per_thread`` of them: few enough registers per thread for ≥ 50% occupancy on an H100
    (docs/gpu-resources.md's table is measured from these settings). A power of two in [4, 16]."""
    return max(4, min(16, triton.next_power_of_2(max(1, tile_elements // (32 * per_thread)))))


def on_tensor_device(fn):
    """Run ``fn`` with its first tensor argument's CUDA device current.

    Triton launches on the current device; without this a tensor on ``cuda:1`` while ``cuda:0`` is
    current would be read through the wrong device's context.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(t.device) if t is not None and t.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return fn(*args, **kwargs)
    return wrapper
