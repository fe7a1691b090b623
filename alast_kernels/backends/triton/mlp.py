"""Budget-masked MLP ``fc2(gelu(fc1(x)))``: cuBLAS matmuls, Triton kernels for the GELU parts.

What runs where:

* forward: ``fc1`` as ``F.linear`` (bias fused into cuBLAS's epilogue), GELU by ``_gelu_fwd_kernel``,
  ``fc2`` as ``F.linear``;
* backward: ``g = grad_y @ W2``, then ``_gelu_bwd_kernel`` in one pass over ``pre`` and ``g`` writes
  ``grad_pre = gelu'(pre) · g`` in place of ``g``, and for a trained block also the recomputed GELU
  output ``h`` (for ``grad_W2``) and per-block column sums of ``grad_pre`` (for ``grad_b1``); the
  remaining products are cuBLAS matmuls.

Frozen (``train=False``): the parameters get no gradient and only ``pre`` (fc1's output) and the weights
are saved. Trained: ``x`` and ``pre`` are saved; ``h`` is recomputed, never stored. The forward is the
backend-neutral :func:`~alast_kernels.backends.autograd.mlp_forward`, so autocast and gradient dtypes are
the reference's exactly.

``masked_linear`` has no elementwise part to fuse: the triton backend uses the reference's
(``F.linear`` forward, cuBLAS backward, weight gradients only when trained).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import triton
import triton.language as tl

from ..autograd import mlp_forward, rows
from ..reference import mlp as reference_mlp
from ..support import FLOAT_DTYPES, implements
from . import _common

_BLOCK = 1024  # elements per program of the forward kernel
# Rows x features per program of the backward kernel, 8 per thread with 8 warps (35 registers, 75% occupancy
# on an H100; 32 rows with 4 warps needed 78 registers, 38%).
_BLOCK_M, _BLOCK_F = 16, 128
# Kernel constants must be tl.constexpr globals to be visible inside @triton.jit functions.
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _gelu_and_grad(x, TANH: tl.constexpr, NEED_GRAD: tl.constexpr):
    """GELU of float32 ``x`` and, when ``NEED_GRAD``, its derivative (else 0)."""
    if TANH:
        inner = _SQRT_2_OVER_PI * (x + _TANH_C * x * x * x)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0  # tanh(inner); saturates cleanly at ±1
        gelu = 0.5 * x * (1.0 + t)
        grad = 0.0
        if NEED_GRAD:
            grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * _SQRT_HALF))
        gelu = x * cdf
        grad = 0.0
        if NEED_GRAD:
            grad = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return gelu, grad


@triton.jit
def _gelu_fwd_kernel(pre_ptr, h_ptr, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32)
    h, _ = _gelu_and_grad(x, TANH, False)
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gelu_bwd_kernel(pre_ptr, g_ptr, h_ptr, db_ptr, M, F, TANH: tl.constexpr, WRITE_H: tl.constexpr,
                     NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    """``g <- gelu'(pre) · g`` in place; optionally ``h = gelu(pre)`` and column sums of the new ``g``."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < F
    m = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
    x = tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    h, dh = _gelu_and_grad(x, TANH, True)
    grad_pre = (g * dh).to(g_ptr.dtype.element_ty)
    tl.store(g_ptr + offs, grad_pre, mask=m)
    if WRITE_H:
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=m)
    if NEED_DB:
        # Sum the rounded values, as a bias gradient computed from the stored grad_pre would.
        tl.store(db_ptr + pid_m * F + cols, tl.sum(grad_pre.to(tl.float32), axis=0), mask=col_ok)


def _gelu(pre: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU of a contiguous tensor, same dtype and shape."""
    h = _common.new_output(pre.shape, pre.dtype, pre.device)
    n = pre.numel()
    if n:
        _gelu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](pre, h, n, TANH=approximate == "tanh", BLOCK=_BLOCK)
    return h


def _gelu_backward_(g: torch.Tensor, pre: torch.Tensor, approximate: str, write_h: bool, need_db: bool):
    """Turn ``g`` (contiguous ``(M, F)``, ∂loss/∂gelu) into ∂loss/∂pre in place.

    Returns ``(h, grad_b1)``: the recomputed GELU output when ``write_h``, the float32 column sums of the
    result when ``need_db`` (``None`` otherwise).
    """
    M, Fdim = g.shape
    h = _common.new_output((M, Fdim), pre.dtype, pre.device) if write_h else None
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(Fdim, _BLOCK_F))
    db_part = _common.new_output((grid[0], Fdim), torch.float32, g.device) if need_db else None
    if g.numel():
        _gelu_bwd_kernel[grid](pre, g, h, db_part, M, Fdim, TANH=approximate == "tanh", WRITE_H=write_h,
                               NEED_DB=need_db, BLOCK_M=_BLOCK_M, BLOCK_F=_BLOCK_F,
                               num_warps=_common.num_warps(_BLOCK_M * _BLOCK_F, per_thread=8))
    db = None
    if need_db:
        db = db_part.sum(0) if g.numel() else torch.zeros(Fdim, dtype=torch.float32, device=g.device)
    return h, db


class MaskedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, train: bool, approximate: str):
        return mlp_forward(ctx, x, w1, b1, w2, b2, train, approximate, _gelu)

    @staticmethod
    @_common.on_tensor_device
    def backward(ctx, grad_y):
        x, pre, w1, w2 = ctx.saved_tensors
        grad_y = rows(grad_y.to(w2.dtype))
        pre = rows(pre)
        needs = ctx.needs_input_grad
        dt = ctx.param_dtypes
        grads = [None] * 7
        need_pre = needs[0] or ctx.train_w1
        h = None
        if need_pre:
            grad_pre = (grad_y @ w2).contiguous()
            h, db1 = _gelu_backward_(grad_pre, pre, ctx.approximate, write_h=ctx.train_w2,
                                     need_db=ctx.train_w1 and needs[2])
        elif ctx.train_w2:
            h = _gelu(pre, ctx.approximate)
        if ctx.train_w2:
            if needs[3]:
                grads[3] = (grad_y.t() @ h).to(dt[2])
            if needs[4]:
                grads[4] = grad_y.sum(0).to(dt[3])
        if need_pre:
            if needs[0]:
                grads[0] = (grad_pre @ w1).view(ctx.x_shape)
            if ctx.train_w1 and needs[1]:
                grads[1] = (grad_pre.t() @ rows(x)).to(dt[0])
            if ctx.train_w1 and needs[2]:
                grads[2] = db1.to(dt[1])
        return tuple(grads)


@implements(how="cuBLAS matmuls + Triton GELU forward/backward kernels")
@_common.on_tensor_device
def masked_mlp(x, w1, b1, w2, b2, train, approximate):
    """``fc2(gelu(fc1(x)))``: x ``(..., D)``, w1 ``(F, D)``, w2 ``(Dout, F)``, biases or ``None``; computes in
    float32, float16 or bfloat16 (the GELU kernels' types)."""
    return MaskedMLPFunction.apply(x, w1, b1, w2, b2, train, approximate)


# No elementwise part to fuse: the reference's own function (cuBLAS), declared for this backend too, any dtype.
implements(dtypes=FLOAT_DTYPES, how="the reference's own: cuBLAS, nothing to fuse")(reference_mlp.masked_linear)


def resource_launches(s) -> Dict[str, Callable[[], object]]:
    """``{scenario: call}``: this module's launches at the GPU resource report's shape ``s`` (``B, N, D, H, Dh,
    K, F``; ``benchmarks/gpu_resources.py`` records the launches without running them)."""
    def vit_b():
        pre = torch.zeros(s.B * s.K, s.F, dtype=torch.bfloat16)
        _gelu(pre, "tanh")
        _gelu_backward_(torch.zeros_like(pre), pre, "tanh", write_h=True, need_db=True)
    return {"ViT-B/16": vit_b}
