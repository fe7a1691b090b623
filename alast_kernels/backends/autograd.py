"""Backend-neutral autograd code: the parts of the ops' ``autograd.Function``s that do not depend on whose
kernels run.

* :func:`gather_function` / :func:`scatter_function` build the ``gather_tokens`` / ``scatter_tokens``
  Functions of a backend from its kernels;
* :func:`mlp_forward` is the budget-masked MLP's forward (what it saves and for which gradients), with the
  backend's GELU plugged in; :func:`compute_dtype`, :func:`cast` and :func:`rows` the autocast and shape
  helpers the masked linear layers share.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


# ------------------------------------------------------------------------------------------ gather / scatter
def gather_function(gather: Callable, gather_backward: Callable, name: str) -> type:
    """A ``gather_tokens`` Function over a backend's kernels.

    ``gather(x, idx)``: ``x[b, idx[b]]``, ``(B, N, D)`` and int64 ``(B, K)`` -> ``(B, K, D)``;
    ``gather_backward(grad_out, idx, N)``: ``(B, N, D)`` whose token ``n`` is the sum of the rows
    ``grad_out[b, j]`` with ``idx[b, j] == n`` (repeated indices accumulate). Both get dense tensors.
    """
    class GatherTokens(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, idx):
            idx = idx.contiguous()
            ctx.num_tokens = x.shape[1]
            ctx.save_for_backward(idx)
            return gather(x.contiguous(), idx)

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            (idx,) = ctx.saved_tensors
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = gather_backward(grad_out.contiguous(), idx, ctx.num_tokens)
            return grad_x, None

    GatherTokens.__name__ = GatherTokens.__qualname__ = name
    return GatherTokens


def scatter_function(scatter: Callable, gather: Callable, name: str) -> type:
    """A ``scatter_tokens`` Function over a backend's kernels.

    ``scatter(x, idx, delta)``: ``x`` with ``delta[b, j]`` added at token ``idx[b, j]`` (unique per row), a
    new ``(B, N, D)`` tensor; ``gather`` as for :func:`gather_function`. Backward: ``grad_x = grad_out``,
    ``grad_delta = gather(grad_out, idx)``.
    """
    class ScatterTokens(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, idx, delta):
            idx = idx.contiguous()
            ctx.save_for_backward(idx)
            return scatter(x.contiguous(), idx, delta.contiguous())

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            (idx,) = ctx.saved_tensors
            grad_delta = None
            if ctx.needs_input_grad[2]:
                grad_delta = gather(grad_out.contiguous(), idx)
            return (grad_out if ctx.needs_input_grad[0] else None), None, grad_delta

    ScatterTokens.__name__ = ScatterTokens.__qualname__ = name
    return ScatterTokens


# ------------------------------------------------------------------------------------------ masked linear layers
def compute_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device when autocast is on there, else ``None`` (``x``'s own)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return t if t is None or dtype is None else t.to(dtype)


def rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., F)`` -> ``(M, F)``."""
    return t.reshape(-1, t.shape[-1])


def mlp_forward(ctx, x, w1, b1, w2, b2, train: bool, approximate: str, gelu: Callable) -> torch.Tensor:
    """The masked MLP's forward for any backend's ``autograd.Function``; ``gelu(pre, approximate)`` is the
    backend's GELU.

    Under autocast the inputs are cast once to the autocast dtype and the matmuls run with autocast off, so
    forward and backward use one precision. Saves ``(x if fc1 trains, pre, w1, w2)`` in the compute dtype
    and sets on ``ctx`` what backward needs: ``train_w1``, ``train_w2``, ``approximate``, ``x_shape``,
    ``param_dtypes`` (parameter gradients come back in the parameters' own dtypes).
    """
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        xc, w1c, w2c = cast(x, dtype), cast(w1, dtype), cast(w2, dtype)
        pre = F.linear(xc, w1c, cast(b1, dtype)).contiguous()
        y = F.linear(gelu(pre, approximate), w2c, cast(b2, dtype))
    needs = ctx.needs_input_grad
    ctx.train_w1 = train and (needs[1] or needs[2])
    ctx.train_w2 = train and (needs[3] or needs[4])
    ctx.approximate = approximate
    ctx.x_shape = x.shape
    ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (w1, b1, w2, b2))
    ctx.save_for_backward(xc if ctx.train_w1 else None, pre, w1c, w2c)
    return y
