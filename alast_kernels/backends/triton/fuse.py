"""Token fuse (``ops.fuse_tokens``) in one pass over ``x``, and its backward in one pass over the gradient.

Forward, one program per (image, block of channels): the program first finds the row's selection from the
scores alone (the threshold search of :mod:`.select`, so ties and NaN go exactly as ``select_tokens``
decides), then walks the tokens once in index order. Each block of tokens is loaded once and either
copied to its output row (prefix and kept tokens; the output slot is a running count, so the kept tokens
come out in ascending index order) or added, times its score, into a float32 accumulator that becomes the
fused token, written last. The program for the first channel block also writes ``slot[b, n]``: the output
row of token ``n``, or -1 when it was fused. That int32 map and the scores are all the backward keeps.

Backward, same grid: ``grad_x[b, n] = grad_out[b, slot]`` for a kept token, ``scores[b, n] · grad_fused``
for a fused one — every element of ``grad_x`` written once, no atomics.

Not float64 (tokens or scores): converting float64 scores to float32 keys could merge distinct scores and
change the selection; the backend declares float32/float16/bfloat16 and the dispatcher runs the reference
for float64 calls.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import triton
import triton.language as tl

from ..support import implements
from . import _common
from .select import _MAX_BLOCK as _MAX_SELECT_BLOCK, _selected, _sort_keys, _threshold

_MAX_BLOCK_N = 32  # tokens per tile of the walk over a row
_MAX_BLOCK_D = 128  # channels per program; wider rows use several programs


@triton.jit
def _fuse_fwd_kernel(x_ptr, s_ptr, out_ptr, slot_ptr, N, D, keep, P: tl.constexpr, SELECT_BLOCK: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    s_row = s_ptr + b * N
    x_row = x_ptr + b * N * D
    out_rows = P + keep + 1
    o_row = out_ptr + b * out_rows * D

    # Which candidates (tokens P..N-1) are kept depends on the scores only: find the threshold first.
    threshold, equal_wanted = _threshold(s_row + P, N - P, keep, SELECT_BLOCK)

    fused = tl.zeros((BLOCK_D,), tl.float32)
    written = tl.zeros((), tl.int32)
    equal_seen = tl.zeros((), tl.int32)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        in_row = n < N
        candidate = in_row & (n >= P)
        s = tl.load(s_row + n, mask=in_row, other=0.0).to(tl.float32)
        chosen, equal_here = _selected(_sort_keys(s).to(tl.int64), candidate, threshold, equal_wanted,
                                       equal_seen)
        kept = (in_row & (n < P)) | chosen  # the prefix is always kept, and comes first
        kept_i = kept.to(tl.int32)
        slot = written + tl.cumsum(kept_i, axis=0) - kept_i

        m = in_row[:, None] & col_ok[None, :]
        x = tl.load(x_row + n.to(tl.int64)[:, None] * D + cols[None, :], mask=m, other=0.0)
        tl.store(o_row + slot.to(tl.int64)[:, None] * D + cols[None, :], x, mask=kept[:, None] & col_ok[None, :])
        # Dropped tokens only (a kept token's value never meets a weight, so an inf there cannot make NaN).
        dropped = candidate & ~chosen
        fused += tl.sum(tl.where(dropped[:, None] & m, x.to(tl.float32) * s[:, None], 0.0), axis=0)
        tl.store(slot_ptr + b * N + n, tl.where(kept, slot, -1), mask=in_row & (pid_d == 0))

        written += tl.sum(kept_i, axis=0)
        equal_seen += equal_here
    tl.store(o_row + (out_rows - 1) * D + cols, fused.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _fuse_bwd_kernel(g_ptr, s_ptr, slot_ptr, gx_ptr, N, D, out_rows, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    g_row = g_ptr + b * out_rows * D
    g_fused = tl.load(g_row + (out_rows - 1) * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        in_row = n < N
        slot = tl.load(slot_ptr + b * N + n, mask=in_row, other=-1)
        kept = slot >= 0
        m = in_row[:, None] & col_ok[None, :]
        g_kept = tl.load(g_row + slot.to(tl.int64)[:, None] * D + cols[None, :], mask=kept[:, None] & m, other=0.0)
        s = tl.load(s_ptr + b * N + n, mask=in_row & ~kept, other=0.0).to(tl.float32)
        g = tl.where(kept[:, None], g_kept.to(tl.float32), s[:, None] * g_fused[None, :])
        tl.store(gx_ptr + (b * N + n.to(tl.int64))[:, None] * D + cols[None, :], g.to(gx_ptr.dtype.element_ty),
                 mask=m)


def _grid(B: int, D: int):
    block_d = min(_MAX_BLOCK_D, _common.row_block(D))
    return (B, triton.cdiv(D, block_d)), block_d


def _block_n(N: int) -> int:
    return min(_MAX_BLOCK_N, _common.row_block(N))


class FuseTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scores, keep, num_prefix):
        B, N, D = x.shape
        out = _common.new_output((B, num_prefix + keep + 1, D), x.dtype, x.device)
        slots = _common.new_output((B, N), torch.int32, x.device)
        if B and D:
            grid, block_d = _grid(B, D)
            select_block = min(_MAX_SELECT_BLOCK, _common.row_block(N - num_prefix))
            _fuse_fwd_kernel[grid](x, scores, out, slots, N, D, keep, P=num_prefix, SELECT_BLOCK=select_block,
                                   BLOCK_N=_block_n(N), BLOCK_D=block_d,
                                   num_warps=_common.num_warps(_block_n(N) * block_d, per_thread=16))
        ctx.save_for_backward(scores, slots)
        return out

    @staticmethod
    @_common.on_tensor_device
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        scores, slots = ctx.saved_tensors
        B, N = slots.shape
        out_rows, D = grad_out.shape[1:]
        grad_x = _common.new_output((B, N, D), grad_out.dtype, grad_out.device)
        if B and D:
            grid, block_d = _grid(B, D)
            _fuse_bwd_kernel[grid](grad_out.contiguous(), scores, slots, grad_x, N, D, out_rows,
                                   BLOCK_N=_block_n(N), BLOCK_D=block_d,
                                   num_warps=_common.num_warps(_block_n(N) * block_d, per_thread=16))
        return grad_x, None, None, None


@implements(how="one pass over `x`: the row's selection from the scores, kept rows copied, the rest summed "
                "into the fused token; backward one pass, no atomics")
@_common.on_tensor_device
def fuse_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """``(B, N, D)`` tokens and ``(B, N)`` scores -> ``(B, num_prefix + keep + 1, D)`` in ``x``'s dtype
    (see the module docstring); the fused token is accumulated in float32 and rounded once."""
    return FuseTokensFunction.apply(x.contiguous(), scores.detach().contiguous(), keep, num_prefix)


def resource_launches(s) -> Dict[str, Callable[[], object]]:
    """``{scenario: call}``: this module's launches at the GPU resource report's shape ``s`` (``B, N, D, H, Dh,
    K, F``; ``benchmarks/gpu_resources.py`` records the launches without running them)."""
    def vit_b():
        x = torch.zeros(s.B, s.N, s.D, dtype=torch.bfloat16, requires_grad=True)
        fused = fuse_tokens(x, torch.zeros(s.B, s.N), 138, 1)  # Sparse-Tuning's keep rate 0.7 of 196 patches
        fused.backward(torch.zeros_like(fused))
    return {"ViT-B/16": vit_b}
