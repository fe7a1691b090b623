"""Attention of a few queries over many keys and values: one program per (image, head) owns every query.

Shapes: ``q`` ``(B, H, Tq, Dh)`` with ``Tq <= 128``, ``k``/``v`` ``(B, H, Nk, Dh)``, any strides (SynQT
passes views of a cached ``(B, 2, H, Nk, Dh)`` key/value buffer), float32/float16/bfloat16, float32
accumulation, head dims up to 128 (padded to a power of two with masks).

Why a kernel of its own rather than the flash kernel of :mod:`.attention`: with ``Tq`` a handful of
queries, every query of one head fits in a single tile. Then

* the forward reads each key and value once (one pass, online softmax) and keeps the per-row base-2
  logsumexp ``lse`` (float32 ``(B, H, Tq)``);
* the backward is a single kernel that recomputes the probabilities from ``lse`` block by block and
  accumulates ``dq`` in registers. When the keys and values need gradients too, the same program writes
  ``dk``/``dv`` for each key block as it passes: it holds all the queries, so no other program
  contributes to those rows and no atomics are needed. When they need none (frozen keys and values) that
  work is compiled out (``KV_GRAD``).

One program per (image, head) gives ``B·H`` programs (768 for a ViT-B batch of 64), enough to fill a GPU at
training batch sizes; a split over the keys (flash-decoding) would only pay at tiny batches. The backend
declares ``Tq`` and head dims up to 128 and float32/float16/bfloat16: the dispatcher runs the reference
(``F.scaled_dot_product_attention``) for anything else.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import triton
import triton.language as tl

from ..support import implements
from . import _common
from .attention import MAX_HEAD_DIM, attend_all_keys

_LOG2E = math.log2(math.e)
MAX_QUERIES = 128  # declared below, on `query_attention` (with attention's head dim limit): one tile of queries
# Key blocks under the interpreter: 16 makes the tiny test shapes span several blocks; None takes the GPU's.
INTERPRETER_BLOCK = 16


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _qattn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                      sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                      so_b, so_h, so_t, so_d, H, Tq, Nk, Dh, qk_scale,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Tq
    dim_ok = dims < Dh
    # Every query of this head, loaded once; padded rows and dims are zeros and never stored.
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :] * sq_d,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    acc, top, total = attend_all_keys(q, k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h, sk_n, sk_d,
                                      sv_n, sv_d, Nk, qk_scale, dims, dim_ok, BLOCK_T, BLOCK_N, BLOCK_D, PRECISION)
    out = acc / total[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + rows[:, None] * so_t + dims[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Tq + rows, top + tl.log2(total), mask=row_ok)


@triton.jit
def _qattn_bwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
                      sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                      so_b, so_h, so_t, so_d, sg_b, sg_h, sg_t, sg_d, H, Tq, Nk, Dh, scale, qk_scale,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      KV_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Tq
    dim_ok = dims < Dh
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :] * sq_d, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * sg_b + h * sg_h + rows[:, None] * sg_t + dims[None, :] * sg_d, mask=q_mask, other=0.0)
    o = tl.load(o_ptr + b * so_b + h * so_h + rows[:, None] * so_t + dims[None, :] * so_d, mask=q_mask, other=0.0)
    # The softmax backward's per-row constant rowsum(o·do), computed here: the program holds every row.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    kv_out = bh.to(tl.int64) * Nk * Dh  # dk, dv: contiguous (B, H, Nk, Dh)
    dq = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for start in range(0, Nk, BLOCK_N):
        keys = start + cols
        key_ok = keys < Nk
        t_mask = dim_ok[:, None] & key_ok[None, :]
        kt = tl.load(k_base + keys[None, :] * sk_n + dims[:, None] * sk_d, mask=t_mask, other=0.0)
        vt = tl.load(v_base + keys[None, :] * sv_n + dims[:, None] * sv_d, mask=t_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        # Padded query rows would get p = exp2(0 - 0) = 1: mask them so they add nothing to dk/dv.
        p = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
        if KV_GRAD:
            dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            offs = kv_out + keys[:, None] * Dh + dims[None, :]
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dq_ptr + bh.to(tl.int64) * Tq * Dh + rows[:, None] * Dh + dims[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------------------------------ launchers
def _settings(Tq: int, Dh: int, dtype: torch.dtype, backward: bool = False):
    """Query tile, key block, head-dim block, warps and the float32 dot precision (TF32 only where
    PyTorch allows it)."""
    block_t = _common.row_block(Tq)  # all queries in one tile; 16 rows at least for tl.dot
    block_d = _common.row_block(Dh)
    if _common.interpreting() and INTERPRETER_BLOCK is not None:
        block_n = INTERPRETER_BLOCK
    else:
        # float32 key/value tiles take twice the shared memory of 16-bit ones. The backward keeps more
        # tiles live (dq, and dk/dv when they are needed): half the keys per block, so that 8 warps hold
        # them in registers at 50% occupancy on an H100 (docs/gpu-resources.md).
        block_n = (32 if dtype == torch.float32 else 64) // (2 if backward else 1)
    warps = 8
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return block_t, block_n, block_d, warps, ("tf32" if tf32 else "ieee")


def _forward(q, k, v, scale):
    B, H, Tq, Dh = q.shape
    Nk = k.shape[2]
    block_t, block_n, block_d, warps, precision = _settings(Tq, Dh, q.dtype)
    # (B, Tq, H, Dh) in memory, returned as its (B, H, Tq, Dh) view: merging the heads back is a view.
    o = _common.new_output((B, Tq, H, Dh), q.dtype, q.device).transpose(1, 2)
    lse = _common.new_output((B, H, Tq), torch.float32, q.device)
    _qattn_fwd_kernel[(B * H,)](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, Tq, Nk, Dh, scale * _LOG2E,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, num_warps=warps)
    return o, lse


def _backward(q, k, v, o, lse, do, scale, kv_grad: bool):
    B, H, Tq, Dh = q.shape
    Nk = k.shape[2]
    block_t, block_n, block_d, warps, precision = _settings(Tq, Dh, q.dtype, backward=True)
    dq = _common.new_output((B, H, Tq, Dh), q.dtype, q.device)
    if kv_grad:
        dk = _common.new_output((B, H, Nk, Dh), k.dtype, k.device)
        dv = _common.new_output((B, H, Nk, Dh), v.dtype, v.device)
    else:
        dk = dv = dq  # never written: KV_GRAD=False compiles the stores out
    _qattn_bwd_kernel[(B * H,)](
        q, k, v, o, do, lse, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(),
        H, Tq, Nk, Dh, scale, scale * _LOG2E,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, KV_GRAD=kv_grad, PRECISION=precision,
        num_warps=warps)
    return dq, (dk if kv_grad else None), (dv if kv_grad else None)


class QueryAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @_common.on_tensor_device
    def backward(ctx, grad_o):
        q, k, v, o, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _backward(q, k, v, o, lse, grad_o, ctx.scale, kv_grad=need_k or need_v)
        return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None), None


@implements(max_head_dim=MAX_HEAD_DIM, max_queries=MAX_QUERIES,
            how="all queries in one tile, one pass over keys and values; backward with key/value gradients only "
                "when they are needed")
@_common.on_tensor_device
def query_attention(q, k, v, scale: float):
    """``softmax(q kᵀ · scale) v``: ``(B, H, Tq, Dh)`` in the dtype of ``q`` (``Tq`` ≤ 128, ``Dh`` ≤ 128)."""
    return QueryAttentionFunction.apply(q, k, v, scale)


def resource_launches(s) -> Dict[str, Callable[[], object]]:
    """``{scenario: call}``: this module's launches at the GPU resource report's shape ``s`` (``B, N, D, H, Dh,
    K, F``; ``benchmarks/gpu_resources.py`` records the launches without running them)."""
    def vit_b():
        queries = torch.zeros(s.B, s.H, 4, s.Dh, dtype=torch.bfloat16, requires_grad=True)  # SynQT: 4 per layer
        for kv_grad in (False, True):
            kv = torch.zeros(s.B, s.H, s.N, s.Dh, dtype=torch.bfloat16, requires_grad=kv_grad)
            query_attention(queries, kv, kv, s.Dh ** -0.5).backward(torch.zeros_like(queries))
    return {"ViT-B/16": vit_b}
