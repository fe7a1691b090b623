"""gather_tokens / scatter_tokens on the ``alast::`` row-copy kernels, with their backward passes.

gather backward is ``alast::gather_tokens_backward`` (rows summed per target token, no atomics; repeated
indices accumulate); scatter backward is the identity for ``x`` and a gather for ``delta``.
"""
import torch
from torch.autograd.function import once_differentiable

from ..reference import tokens as _reference


class GatherTokensFunction(torch.autograd.Function):
    """``x (B, N, D)``, int64 ``idx (B, K)`` -> ``(B, K, D)``."""

    @staticmethod
    def forward(ctx, x, idx):
        idx = idx.contiguous()
        ctx.num_tokens = x.shape[1]
        ctx.save_for_backward(idx)
        return torch.ops.alast.gather_tokens(x.contiguous(), idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.alast.gather_tokens_backward(grad_out.contiguous(), idx, ctx.num_tokens)
        return grad_x, None


class ScatterTokensFunction(torch.autograd.Function):
    """``x (B, N, D)``, int64 ``idx (B, K)`` unique per row, ``delta (B, K, D)`` -> ``(B, N, D)``."""

    @staticmethod
    def forward(ctx, x, idx, delta):
        idx = idx.contiguous()
        ctx.save_for_backward(idx)
        return torch.ops.alast.scatter_tokens(x.contiguous(), idx, delta.contiguous())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        grad_delta = None
        if ctx.needs_input_grad[2]:
            grad_delta = torch.ops.alast.gather_tokens(grad_out.contiguous(), idx)
        return (grad_out if ctx.needs_input_grad[0] else None), None, grad_delta


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float64:
        return _reference.gather_tokens(x, idx)
    return GatherTokensFunction.apply(x, idx)


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float64:
        return _reference.scatter_tokens(x, idx, delta)
    return ScatterTokensFunction.apply(x, idx, delta)
