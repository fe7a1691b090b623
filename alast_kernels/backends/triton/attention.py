"""Flash-style softmax attention, forward and backward, for any token count and head dims up to 128.

Shapes: ``q`` ``(B, H, Nq, Dh)``, ``k``/``v`` ``(B, H, Nk, Dh)``, any strides (the ViT block passes views
of its ``qkv`` projection), float32/float16/bfloat16, float32 accumulation. Tokens are processed in
blocks with masks, so ``Nq``/``Nk`` need not be multiples of anything; a head dim that is not a power of
two is padded to one with masks (80 -> 128).

The forward keeps the per-row base-2 logsumexp ``lse`` (float32 ``(B, H, Nq)``); the backward
recomputes the probabilities from it (FlashAttention-2: one kernel for ``dk``/``dv`` looping over query
blocks, one for ``dq`` looping over key blocks, no atomics). With ``return_cls`` a small kernel turns
query 0's logits and ``lse`` into the head-mean probability row, float32 ``(B, Nk)``, without gradient.

The output is laid out as ``(B, Nq, H, Dh)`` in memory and returned as its ``(B, H, Nq, Dh)`` view, so
the block's ``transpose(1, 2).reshape(B, Nq, H·Dh)`` needs no copy. The backend declares head dims up to
128 and float32/float16/bfloat16: the dispatcher runs the reference for anything else.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import triton
import triton.language as tl

from ..support import implements
from . import _common

_LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 128  # declared below, on `attention`: 128-wide tiles fit the shared memory
# Token tiles under the interpreter: 16 makes the tiny test shapes span several tiles; None takes the GPU's
# tiles (the ViT-B/16-shape tests, where fewer, larger tiles are also faster to interpret).
INTERPRETER_BLOCK = 16


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def attend_all_keys(q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, Nk, qk_scale, dims, dim_ok,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax attention of a tile of queries over all ``Nk`` keys, in one pass (online softmax).

    ``q``: ``(ROWS, BLOCK_D)``, padded rows and dims zero; ``k_base``/``v_base``: one (image, head)'s keys and
    values. Returns the unnormalised output ``acc`` ``(ROWS, BLOCK_D)`` float32, each row's running maximum
    ``top`` and sum ``total``: the output is ``acc / total``, the base-2 logsumexp (what the backward
    recomputes the probabilities from) ``top + log2(total)``. Shared with the query-attention kernel.
    """
    cols = tl.arange(0, BLOCK_N)
    top = tl.full((ROWS,), float("-inf"), tl.float32)
    total = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for start in range(0, Nk, BLOCK_N):
        keys = start + cols
        key_ok = keys < Nk
        kt = tl.load(k_base + keys[None, :] * sk_n + dims[:, None] * sk_d,
                     mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
        # Logits in base 2 (qk_scale = scale·log2 e) so the softmax uses exp2, the hardware's native exp.
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))  # finite: every block holds at least one real key
        alpha = tl.exp2(top - new_top)  # rescales what earlier blocks accumulated to the new maximum
        p = tl.exp2(s - new_top[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * sv_n + dims[None, :] * sv_d,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        top = new_top
    return acc, top, total


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                     so_b, so_h, so_n, so_d, H, Nq, Nk, Dh, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    pid_m = tl.program_id(1)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Nq
    dim_ok = dims < Dh
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dims[None, :] * sq_d,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    acc, top, total = attend_all_keys(q, k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h, sk_n, sk_d,
                                      sv_n, sv_d, Nk, qk_scale, dims, dim_ok, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    out = acc / total[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + rows[:, None] * so_n + dims[None, :] * so_d,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * Nq + rows, top + tl.log2(total), mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, so_b, so_h, so_n, so_d, sg_b, sg_h, sg_n, sg_d,
                           H, Nq, Dh, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``delta = rowsum(o · do)``, float32 ``(B, H, Nq)``: the softmax backward's per-row constant."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    m = (rows < Nq)[:, None] & (dims < Dh)[None, :]
    o = tl.load(o_ptr + b * so_b + h * so_h + rows[:, None] * so_n + dims[None, :] * so_d, mask=m, other=0.0)
    do = tl.load(do_ptr + b * sg_b + h * sg_h + rows[:, None] * sg_n + dims[None, :] * sg_d, mask=m, other=0.0)
    tl.store(delta_ptr + bh.to(tl.int64) * Nq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1),
             mask=rows < Nq)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                          sg_b, sg_h, sg_n, sg_d, H, Nq, Nk, Dh, scale, qk_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < Nk
    dim_ok = dims < Dh
    kv_mask = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + b * sk_b + h * sk_h + keys[:, None] * sk_n + dims[None, :] * sk_d, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + keys[:, None] * sv_n + dims[None, :] * sv_d, mask=kv_mask, other=0.0)
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sg_b + h * sg_h
    row_base = bh.to(tl.int64) * Nq
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, Nq, BLOCK_M):
        rows = start + rows0
        row_ok = rows < Nq
        qt = tl.load(q_base + rows[None, :] * sq_n + dims[:, None] * sq_d,
                     mask=dim_ok[:, None] & row_ok[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * sg_n + dims[None, :] * sg_d,
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (keys, rows), base 2
        pt = tl.where(key_ok[:, None] & row_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    out_offs = bh.to(tl.int64) * Nk * Dh + keys[:, None] * Dh + dims[None, :]  # dk, dv: contiguous
    tl.store(dk_ptr + out_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                        sg_b, sg_h, sg_n, sg_d, H, Nq, Nk, Dh, scale, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Nq
    dim_ok = dims < Dh
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dims[None, :] * sq_d, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * sg_b + h * sg_h + rows[:, None] * sg_n + dims[None, :] * sg_d, mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Nq + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * Nq + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, Nk, BLOCK_N):
        keys = start + cols
        key_ok = keys < Nk
        t_mask = dim_ok[:, None] & key_ok[None, :]
        kt = tl.load(k_base + keys[None, :] * sk_n + dims[:, None] * sk_d, mask=t_mask, other=0.0)
        vt = tl.load(v_base + keys[None, :] * sv_n + dims[:, None] * sv_d, mask=t_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    tl.store(dq_ptr + bh.to(tl.int64) * Nq * Dh + rows[:, None] * Dh + dims[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _cls_row_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, sq_b, sq_h, sq_d, sk_b, sk_h, sk_n, sk_d,
                    H, Nq, Nk, Dh, qk_scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head mean of query 0's probabilities ``exp2(q0·k·scale·log2e - lse0)``, float32 ``(B, Nk)``."""
    b = tl.program_id(0).to(tl.int64)
    keys = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < Nk
    dim_ok = dims < Dh
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for h in range(H):
        q0 = tl.load(q_ptr + b * sq_b + h * sq_h + dims * sq_d, mask=dim_ok, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + keys[:, None] * sk_n + dims[None, :] * sk_d,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        lse0 = tl.load(lse_ptr + (b * H + h) * Nq)
        acc += tl.exp2(tl.sum(k * q0[None, :], axis=1) * qk_scale - lse0)
    tl.store(out_ptr + b * Nk + keys, acc / H, mask=key_ok)


# ------------------------------------------------------------------------------------------ launchers
def _settings(Dh: int, dtype: torch.dtype):
    """Block sizes, warps and the float32 dot precision (TF32 only where PyTorch allows it)."""
    block_d = _common.row_block(Dh)
    if _common.interpreting() and INTERPRETER_BLOCK is not None:
        block = INTERPRETER_BLOCK
    else:
        # float32 tiles take twice the shared memory: 32 keeps head dim 128 under 100 KB (sm_80 and up).
        block = 32 if dtype == torch.float32 else 64
    # 8 warps: with 4, the 64-wide tiles of the backward kernels need 255 registers and spill on sm_80, and
    # the float32 forward spills on sm_90 (docs/gpu-resources.md).
    warps = 8
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return block, block_d, warps, ("tf32" if tf32 else "ieee")


def _attention_forward(q, k, v, scale):
    B, H, Nq, Dh = q.shape
    Nk = k.shape[2]
    block, block_d, warps, precision = _settings(Dh, q.dtype)
    o = _common.new_output((B, Nq, H, Dh), q.dtype, q.device).transpose(1, 2)
    lse = _common.new_output((B, H, Nq), torch.float32, q.device)
    _attn_fwd_kernel[(B * H, triton.cdiv(Nq, block))](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, Nq, Nk, Dh, scale * _LOG2E,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PRECISION=precision, num_warps=warps)
    return o, lse


def _attention_backward(q, k, v, o, lse, do, scale):
    B, H, Nq, Dh = q.shape
    Nk = k.shape[2]
    block, block_d, warps, precision = _settings(Dh, q.dtype)
    delta = _common.new_output((B, H, Nq), torch.float32, q.device)
    _attn_bwd_delta_kernel[(B * H, triton.cdiv(Nq, block))](
        o, do, delta, *o.stride(), *do.stride(), H, Nq, Dh, BLOCK_M=block, BLOCK_D=block_d)
    dq = _common.new_output((B, H, Nq, Dh), q.dtype, q.device)
    dk = _common.new_output((B, H, Nk, Dh), k.dtype, k.device)
    dv = _common.new_output((B, H, Nk, Dh), v.dtype, v.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, Nq, Nk, Dh, scale, scale * _LOG2E)
    _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(Nk, block))](
        q, k, v, do, lse, delta, dk, dv, *strides,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PRECISION=precision, num_warps=warps)
    _attn_bwd_dq_kernel[(B * H, triton.cdiv(Nq, block))](
        q, k, v, do, lse, delta, dq, *strides,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PRECISION=precision, num_warps=warps)
    return dq, dk, dv


def _cls_row(q, k, lse, scale):
    B, H, Nq, Dh = q.shape
    Nk = k.shape[2]
    out = _common.new_output((B, Nk), torch.float32, q.device)
    block_d = _common.row_block(Dh)
    block_n = max(16, min(128, 8192 // block_d, triton.next_power_of_2(Nk)))
    sq = q.stride()
    _cls_row_kernel[(B, triton.cdiv(Nk, block_n))](
        q, k, lse, out, sq[0], sq[1], sq[3], *k.stride(), H, Nq, Nk, Dh, scale * _LOG2E,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=_common.num_warps(block_n * block_d, per_thread=32))
    return out


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @_common.on_tensor_device
    def backward(ctx, grad_o, _grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(q, k, v, o, lse, grad_o, ctx.scale)
        return dq, dk, dv, None


@implements(max_head_dim=MAX_HEAD_DIM,
            how="flash forward/backward, any token count, class-token row from the saved logsumexp")
@_common.on_tensor_device
def attention(q, k, v, scale: float, return_cls: bool):
    """``softmax(q kᵀ · scale) v`` (``(B, H, Nq, Dh)``, dtype of ``q``, ``Dh`` ≤ 128); with ``return_cls``
    also the float32 ``(B, Nk)`` head mean of query 0's probability row (no gradient)."""
    o, lse = AttentionFunction.apply(q, k, v, scale)
    if return_cls:
        return o, _cls_row(q.detach(), k.detach(), lse, scale)
    return o


def resource_launches(s) -> Dict[str, Callable[[], object]]:
    """``{scenario: call}``: this module's launches at the GPU resource report's shape ``s`` (``B, N, D, H, Dh,
    K, F``; ``benchmarks/gpu_resources.py`` records the launches without running them)."""
    def forward_backward(q, cls_row=False):
        scale = q.shape[-1] ** -0.5
        o, lse = _attention_forward(q, q, q, scale)
        _attention_backward(q, q, q, o, lse, torch.zeros_like(q), scale)
        if cls_row:
            _cls_row(q, q, lse, scale)
    return {"ViT-B/16": lambda: forward_backward(torch.zeros(s.B, s.H, s.K, s.Dh, dtype=torch.bfloat16), True),
            "float32": lambda: forward_backward(torch.zeros(s.B, s.H, s.K, s.Dh)),  # other tiles
            "head dim 128": lambda: forward_backward(torch.zeros(s.B, 6, s.K, 128, dtype=torch.bfloat16))}
