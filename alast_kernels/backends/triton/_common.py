"""Helpers shared by the Triton launchers: output allocation, layout checks, launch settings."""
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


def contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dense row-major layout (a copy when it is not), as the flat-indexing kernels assume."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t if t.is_contiguous() else t.contiguous()


def check_index_tensor(name: str, idx: torch.Tensor, batch: int, device: torch.device) -> None:
    """Layout checks on an index tensor that the ops layer leaves to the backend (values are its job)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 2:
        raise TypeError(f"{name}: expected an int64 (B, K) tensor, got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)} of shape {tuple(getattr(idx, 'shape', ()))}")
    if idx.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {idx.device}")
    if idx.shape[0] != batch:
        raise ValueError(f"{name}: expected batch size {batch}, got {idx.shape[0]}")


def check_device(name: str, t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the interpreter: anything else raises."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(f"{name}: the triton backend runs on CUDA tensors (CPU tensors only with "
                     f"TRITON_INTERPRET=1), got a tensor on {t.device}")


def row_block(n: int) -> int:
    """Power-of-two block covering ``n`` elements of a row (at least 16, Triton's smallest dot tile)."""
    return max(16, triton.next_power_of_2(n))


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
