"""Class-token scores of every token without projecting every key
(docs/alast.md, "Scoring without projecting every key"), one read of ``x``.

The host computes, per image and head, the class-query vector ``u`` of
:mod:`alast_kernels.backends.class_query` (shared by every backend), times ``log2(e)``; a token's base-2
logit is then ``x̂_n · u`` with ``x̂_n`` its standardised value.

Kernels: ``_logits_kernel`` (grid ``B × token blocks``) reads each token once, standardises it, writes
its ``H`` logits and each block's per-head running max and exp-sum; ``_softmax_mean_kernel`` combines
the block statistics and writes the head mean of the softmax. With a ``k_norm`` the identity does not
hold: the reference (which projects the keys) runs instead; so does float64 input.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import triton
import triton.language as tl

from ..class_query import class_query_vectors
from ..support import implements
from . import _common

# Elements of x per program of the logits kernel, 16 per thread with 8 warps (40 registers, 75% occupancy
# on an H100 at D = 768; 8192 with 4 warps needed 96 registers, 31%).
_TILE = 4096


@triton.jit
def _logits_kernel(x_ptr, u_ptr, logit_ptr, max_ptr, sum_ptr, N, D, H, C, eps,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    toks = c * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    tok_ok = toks < N
    col_ok = cols < D
    m = tok_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + (b * N + toks)[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m, x - mean[:, None], 0.0)
    xhat = xc * (1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps))[:, None]
    for h in range(H):
        u = tl.load(u_ptr + (b * H + h) * D + cols, mask=col_ok, other=0.0)
        logit = tl.sum(xhat * u[None, :], axis=1)  # base 2: u carries scale · log2(e)
        tl.store(logit_ptr + (b * H + h) * N + toks, logit, mask=tok_ok)
        top = tl.max(tl.where(tok_ok, logit, float("-inf")), axis=0)
        total = tl.sum(tl.where(tok_ok, tl.exp2(logit - top), 0.0), axis=0)
        tl.store(max_ptr + (b * C + c) * H + h, top)
        tl.store(sum_ptr + (b * C + c) * H + h, total)


@triton.jit
def _softmax_mean_kernel(logit_ptr, max_ptr, sum_ptr, out_ptr, N, H, C,
                         BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < H
    # Per-head max and exp-sum over all tokens, from the per-block statistics.
    top = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_H,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        m = (chunks < C)[:, None] & head_ok[None, :]
        offs = (b * C + chunks)[:, None] * H + heads[None, :]
        cmax = tl.load(max_ptr + offs, mask=m, other=float("-inf"))
        csum = tl.load(sum_ptr + offs, mask=m, other=0.0)
        new_top = tl.maximum(top, tl.max(cmax, axis=0))
        safe_top = tl.where(head_ok, new_top, 0.0)  # padded heads stay -inf; keep their maths finite
        scaled = tl.where(m, csum * tl.exp2(cmax - safe_top[None, :]), 0.0)
        total = total * tl.where(head_ok, tl.exp2(top - safe_top), 0.0) + tl.sum(scaled, axis=0)
        top = new_top
    top = tl.where(head_ok, top, 0.0)
    inv = tl.where(head_ok, 1.0 / tl.where(head_ok, total, 1.0), 0.0)

    toks = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = toks < N
    m = head_ok[:, None] & tok_ok[None, :]
    logit = tl.load(logit_ptr + (b * H + heads)[:, None] * N + toks[None, :], mask=m, other=0.0)
    prob = tl.where(m, tl.exp2(logit - top[:, None]) * inv[:, None], 0.0)
    tl.store(out_ptr + b * N + toks, tl.sum(prob, axis=0) / H, mask=tok_ok)


# No k_norm: the scoring identity needs plain keys (the reference projects them).
@implements(k_norm=False, how="one read of `x`: LayerNorm statistics, H logits, softmax, head mean")
@_common.on_tensor_device
def cls_scores(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, eps, scale, q_norm, k_norm):
    """Float32 ``(B, N)`` head-mean class-token attention row of ``x`` ``(B, N, D)``; no gradient."""
    B, N, D = x.shape
    H = num_heads
    u = class_query_vectors(x, norm_weight, norm_bias, qkv_weight, qkv_bias, H, eps, scale, q_norm, torch.float32)
    u = u * math.log2(math.e)  # the kernels take exp2
    with torch.no_grad():
        x = x.detach().contiguous()
        out = _common.new_output((B, N), torch.float32, x.device)
        if out.numel() == 0:
            return out
        block_d = _common.row_block(D)
        block_n = max(1, min(64, _TILE // block_d, triton.next_power_of_2(N)))
        C = triton.cdiv(N, block_n)
        logits = _common.new_output((B, H, N), torch.float32, x.device)
        block_max = _common.new_output((B, C, H), torch.float32, x.device)
        block_sum = _common.new_output((B, C, H), torch.float32, x.device)
        _logits_kernel[(B, C)](x, u, logits, block_max, block_sum, N, D, H, C, eps,
                               BLOCK_N=block_n, BLOCK_D=block_d,
                               num_warps=_common.num_warps(block_n * block_d, per_thread=16))
        block_h = triton.next_power_of_2(H)
        out_block = max(16, min(256, 2048 // block_h, triton.next_power_of_2(N)))  # 16 per thread
        _softmax_mean_kernel[(B, triton.cdiv(N, out_block))](
            logits, block_max, block_sum, out, N, H, C, BLOCK_N=out_block, BLOCK_H=block_h,
            BLOCK_C=max(2, min(64, triton.next_power_of_2(C))))
    return out


def resource_launches(s) -> Dict[str, Callable[[], object]]:
    """``{scenario: call}``: this module's launches at the GPU resource report's shape ``s`` (``B, N, D, H, Dh,
    K, F``; ``benchmarks/gpu_resources.py`` records the launches without running them)."""
    x = torch.zeros(s.B, s.N, s.D, dtype=torch.bfloat16)
    return {"ViT-B/16": lambda: cls_scores(x, None, None, torch.zeros(3 * s.D, s.D), None, s.H, 1e-6, s.Dh ** -0.5,
                                           None, None)}
