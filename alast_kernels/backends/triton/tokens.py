"""Token gather, scatter and fused gather + LayerNorm along dim 1, each with its backward.

Shapes: ``x`` ``(B, N, D)`` float32/float16/bfloat16, ``idx`` int64 ``(B, K)`` (values checked by the ops
layer or guaranteed by the caller), gathered tensors ``(B, K, D)``. Every kernel works on flat rows: kept row
``r = b·K + j`` reads token row ``b·N + idx[b, j]``. The autograd Functions of gather and scatter are the
shared ones of :mod:`alast_kernels.backends.autograd` over these kernels.

Repeated indices: gather and gather + LayerNorm allow them; their backward accumulates with atomic adds
into a float32 buffer, so 16-bit sums are not rounded per addend. Scatter
requires indices unique within each row, as its contract says: each output token is written once
(with a repeated index, one of the updates would win).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import triton
import triton.language as tl

from ..autograd import gather_function, scatter_function
from ..support import implements
from . import _common

_BLOCK_ROWS = 4  # kept rows per program
# The LayerNorm backward keeps five row tiles live: 2 rows per program and 4 elements per thread (16 warps
# at D = 768: 40 registers, 75% occupancy on an H100; 4 rows with 4 warps needed 128 registers, 25%).
_BWD_BLOCK_ROWS = 2
_MAX_BLOCK_D = 1024  # channel block of the copy kernels; wider rows use several programs


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, R, K, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    src = (rows // K).to(tl.int64) * N + tl.load(idx_ptr + rows, mask=row_ok, other=0)
    m = row_ok[:, None] & (cols < D)[None, :]
    vals = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=m)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], vals, mask=m)


@triton.jit
def _scatter_add_rows_kernel(src_ptr, idx_ptr, acc_ptr, R, K, N, D, BLOCK_R: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """``acc[b, idx[b, j]] += src[b, j]`` with atomics (repeated indices accumulate)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    dst = (rows // K).to(tl.int64) * N + tl.load(idx_ptr + rows, mask=row_ok, other=0)
    m = row_ok[:, None] & (cols < D)[None, :]
    vals = tl.load(src_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=m, other=0.0)
    tl.atomic_add(acc_ptr + dst[:, None] * D + cols[None, :], vals.to(acc_ptr.dtype.element_ty), mask=m)


@triton.jit
def _inverse_index_kernel(idx_ptr, pos_ptr, R, K, N, BLOCK: tl.constexpr):
    """``pos[b, idx[b, j]] = j``: which kept row (if any) updates each token."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < R
    dst = (rows // K).to(tl.int64) * N + tl.load(idx_ptr + rows, mask=ok, other=0)
    tl.store(pos_ptr + dst, (rows % K).to(tl.int32), mask=ok)


@triton.jit
def _scatter_kernel(x_ptr, delta_ptr, pos_ptr, out_ptr, T, K, N, D, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """``out[t] = x[t] + delta[pos[t]]`` for token rows with ``pos >= 0``, else ``x[t]``: one pass over x."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    m = row_ok[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    vals = tl.load(x_ptr + offs, mask=m)
    drow = (rows // N).to(tl.int64) * K + pos
    upd = tl.load(delta_ptr + drow[:, None] * D + cols[None, :], mask=m & (pos >= 0)[:, None], other=0.0)
    tl.store(out_ptr + offs, vals + upd, mask=m)


@triton.jit
def _gather_ln_fwd_kernel(x_ptr, idx_ptr, w_ptr, b_ptr, xk_ptr, y_ptr, mean_ptr, rstd_ptr, R, K, N, D, eps,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    src = (rows // K).to(tl.int64) * N + tl.load(idx_ptr + rows, mask=row_ok, other=0)
    m = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=m, other=0.0)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(xk_ptr + offs, x, mask=m)

    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1) / D
    xc = tl.where(m, xf - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _gather_ln_bwd_kernel(x_ptr, idx_ptr, w_ptr, mean_ptr, rstd_ptr, dy_ptr, dxk_ptr, dx_acc_ptr, dw_ptr, db_ptr,
                          R, K, N, D, HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                          NEED_DB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """LayerNorm backward on kept rows; ``dx`` (plus the gathered-token gradient) is scatter-added into
    ``dx_acc``; per-program partial ``dw``/``db`` rows are summed on the host."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    m = row_ok[:, None] & col_ok[None, :]
    src = (rows // K).to(tl.int64) * N + tl.load(idx_ptr + rows, mask=row_ok, other=0)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
    if NEED_DX:
        if HAS_W:
            wdy = dy * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        dx += tl.load(dxk_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(dx_acc_ptr + src[:, None] * D + cols[None, :], dx, mask=m)
    if NEED_DW:
        tl.store(dw_ptr + pid * D + cols, tl.sum(dy * xhat, axis=0), mask=col_ok)
    if NEED_DB:
        tl.store(db_ptr + pid * D + cols, tl.sum(dy, axis=0), mask=col_ok)


# ------------------------------------------------------------------------------------------ launchers
def _copy_grid(rows: int, D: int):
    block_d = min(_MAX_BLOCK_D, _common.row_block(D))
    return (triton.cdiv(rows, _BLOCK_ROWS), triton.cdiv(D, block_d)), block_d


@_common.on_tensor_device
def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, N, D = x.shape
    K = idx.shape[1]
    out = _common.new_output((B, K, D), x.dtype, x.device)
    if out.numel():
        grid, block_d = _copy_grid(B * K, D)
        _gather_kernel[grid](x, idx, out, B * K, K, N, D, BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d)
    return out


@_common.on_tensor_device
def _scatter_add_into_zeros(src: torch.Tensor, idx: torch.Tensor, N: int) -> torch.Tensor:
    """``zeros(B, N, D)`` with ``src[b, j]`` added at token ``idx[b, j]``, in ``src``'s dtype."""
    B, K, D = src.shape
    acc = torch.zeros((B, N, D), dtype=torch.float32, device=src.device)
    if src.numel():
        grid, block_d = _copy_grid(B * K, D)
        _scatter_add_rows_kernel[grid](src, idx, acc, B * K, K, N, D, BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d)
    return acc.to(src.dtype)


@_common.on_tensor_device
def _scatter(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    B, N, D = x.shape
    K = idx.shape[1]
    out = _common.new_output((B, N, D), x.dtype, x.device)
    if not out.numel():
        return out
    pos = torch.full((B, N), -1, dtype=torch.int32, device=x.device)
    if K:
        _inverse_index_kernel[(triton.cdiv(B * K, 256),)](idx, pos, B * K, K, N, BLOCK=256)
    grid, block_d = _copy_grid(B * N, D)
    _scatter_kernel[grid](x, delta, pos, out, B * N, K, N, D, BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d)
    return out


GatherFunction = gather_function(_gather, _scatter_add_into_zeros, "GatherFunction")
ScatterFunction = scatter_function(_scatter, _gather, "ScatterFunction")


@implements(how="row copy; backward atomic scatter-add (repeated indices allowed)")
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]``: ``(B, N, D)``, int64 ``(B, K)`` -> ``(B, K, D)`` in ``x``'s dtype."""
    return GatherFunction.apply(x, idx)


@implements(how="inverse index map, one write per row")
def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x`` with ``delta[b, j]`` added at token ``idx[b, j]`` (unique per row): a new ``(B, N, D)`` tensor."""
    return ScatterFunction.apply(x, idx, delta)


class GatherLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, weight, bias, eps):
        B, N, D = x.shape
        K = idx.shape[1]
        R = B * K
        x_kept = _common.new_output((B, K, D), x.dtype, x.device)
        y = _common.new_output((B, K, D), x.dtype, x.device)
        mean = _common.new_output((R,), torch.float32, x.device)
        rstd = _common.new_output((R,), torch.float32, x.device)
        if R and D:
            _gather_ln_fwd_kernel[(triton.cdiv(R, _BLOCK_ROWS),)](
                x, idx, weight, bias, x_kept, y, mean, rstd, R, K, N, D, eps,
                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_R=_BLOCK_ROWS,
                BLOCK_D=_common.row_block(D), num_warps=_common.num_warps(_BLOCK_ROWS * _common.row_block(D), 16))
        # x is the block's residual input, alive anyway: saving it costs no memory.
        ctx.save_for_backward(x, idx, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return x_kept, y

    @staticmethod
    @_common.on_tensor_device
    def backward(ctx, grad_kept, grad_y):
        x, idx, weight, mean, rstd = ctx.saved_tensors
        B, N, D = x.shape
        K = idx.shape[1]
        R = B * K
        need_dx = ctx.needs_input_grad[0]
        need_dw = weight is not None and ctx.needs_input_grad[2]
        need_db = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
        if not (need_dx or need_dw or need_db) or R == 0:
            return None, None, None, None, None
        programs = triton.cdiv(R, _BWD_BLOCK_ROWS)
        dx_acc = torch.zeros((B, N, D), dtype=torch.float32, device=x.device) if need_dx else None
        dw_part = _common.new_output((programs, D), torch.float32, x.device) if need_dw else None
        db_part = _common.new_output((programs, D), torch.float32, x.device) if need_db else None
        _gather_ln_bwd_kernel[(programs,)](
            x, idx, weight, mean, rstd, grad_y.contiguous(), grad_kept.contiguous(), dx_acc, dw_part, db_part,
            R, K, N, D, HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_R=_BWD_BLOCK_ROWS, BLOCK_D=_common.row_block(D),
            num_warps=_common.num_warps(_BWD_BLOCK_ROWS * _common.row_block(D), per_thread=4))
        grad_x = dx_acc.to(x.dtype) if need_dx else None
        grad_w = dw_part.sum(0).to(weight.dtype) if need_dw else None
        grad_b = db_part.sum(0).to(ctx.bias_dtype) if need_db else None
        return grad_x, None, grad_w, grad_b, None


@implements(how="fused gather + LayerNorm, fused backward")
@_common.on_tensor_device
def gather_layer_norm(x, idx, weight, bias, eps):
    """``(x[b, idx[b]], layer_norm(x[b, idx[b]]))``, both ``(B, K, D)`` in ``x``'s dtype (float32, float16 or
    bfloat16); weight/bias: ``(D,)`` or ``None``. Statistics in float32."""
    params = [None if p is None else p.contiguous() for p in (weight, bias)]
    return GatherLayerNormFunction.apply(x.contiguous(), idx.contiguous(), params[0], params[1], float(eps))


def resource_launches(s) -> Dict[str, Callable[[], object]]:
    """``{scenario: call}``: this module's launches at the GPU resource report's shape ``s`` (``B, N, D, H, Dh,
    K, F``; ``benchmarks/gpu_resources.py`` records the launches without running them)."""
    def vit_b():
        x = torch.zeros(s.B, s.N, s.D, dtype=torch.bfloat16)
        idx = torch.arange(s.K).expand(s.B, s.K).contiguous()
        _gather(x, idx)
        _scatter_add_into_zeros(torch.zeros(s.B, s.K, s.D, dtype=torch.bfloat16), idx, s.N)
        _scatter(x, idx, torch.zeros(s.B, s.K, s.D, dtype=torch.bfloat16))
        w = torch.ones(s.D, dtype=torch.bfloat16, requires_grad=True)
        kept, y = GatherLayerNormFunction.apply(x.requires_grad_(), idx, w, w, 1e-6)
        torch.autograd.backward((kept, y), (torch.zeros_like(kept), torch.zeros_like(y)))
    return {"ViT-B/16": vit_b}
