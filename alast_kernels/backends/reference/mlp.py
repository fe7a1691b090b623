"""Budget-masked linear layer and MLP: frozen ones compute input gradients only.

A frozen layer (``train=False``) returns no parameter gradients (their ``.grad`` stays ``None``) and saves
only what the input gradient needs: the weight for a linear layer; the fc1 output (GELU's input) and the
weights for the MLP. A trained MLP saves its input and the fc1 output and recomputes the GELU in
backward rather than storing its output.

Under autocast the floating inputs are cast once to the autocast dtype and the matmuls run with
autocast off, so forward and backward use the same precision; parameter gradients come back in the
parameters' own dtype. The MLP's forward is the backend-neutral
:func:`~alast_kernels.backends.autograd.mlp_forward`.
"""
import torch
import torch.nn.functional as F

from ..autograd import cast, compute_dtype, mlp_forward, rows
from ..support import implements


class MaskedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, train: bool):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = cast(x, dtype), cast(weight, dtype)
            y = F.linear(xc, wc, cast(bias, dtype))
        ctx.train = train
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        needs_x = train and ctx.needs_input_grad[1]
        ctx.save_for_backward(xc if needs_x else None, wc)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        grad_y = grad_y.to(w.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ w
        if ctx.train and ctx.needs_input_grad[1]:
            grad_w = (rows(grad_y).t() @ rows(x)).to(ctx.param_dtypes[0])
        if ctx.train and ctx.needs_input_grad[2]:
            grad_b = rows(grad_y).sum(0).to(ctx.param_dtypes[1])
        return grad_x, grad_w, grad_b, None


def _torch_gelu(pre: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(pre, approximate=approximate)


class MaskedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, train: bool, approximate: str):
        return mlp_forward(ctx, x, w1, b1, w2, b2, train, approximate, _torch_gelu)

    @staticmethod
    def backward(ctx, grad_y):
        x, pre, w1, w2 = ctx.saved_tensors
        grad_y = grad_y.to(w2.dtype)
        needs = ctx.needs_input_grad
        dt = ctx.param_dtypes
        grads = [None] * 7
        if ctx.train_w2:
            h = F.gelu(pre, approximate=ctx.approximate)  # recomputed, not stored
            if needs[3]:
                grads[3] = (rows(grad_y).t() @ rows(h)).to(dt[2])
            if needs[4]:
                grads[4] = rows(grad_y).sum(0).to(dt[3])
        if needs[0] or ctx.train_w1:
            grad_pre = torch.ops.aten.gelu_backward(grad_y @ w2, pre, approximate=ctx.approximate)
            if needs[0]:
                grads[0] = grad_pre @ w1
            if ctx.train_w1 and needs[1]:
                grads[1] = (rows(grad_pre).t() @ rows(x)).to(dt[0])
            if ctx.train_w1 and needs[2]:
                grads[2] = rows(grad_pre).sum(0).to(dt[1])
        return tuple(grads)


@implements(how="`autograd.Function` over `F.linear`", vendor="cuBLAS through F.linear")
def masked_linear(x, weight, bias, train):
    return MaskedLinearFunction.apply(x, weight, bias, train)


@implements(how="`autograd.Function`, GELU recomputed", vendor="cuBLAS through F.linear, PyTorch's GELU")
def masked_mlp(x, w1, b1, w2, b2, train, approximate):
    return MaskedMLPFunction.apply(x, w1, b1, w2, b2, train, approximate)
