"""Top-k token selection, one Triton program per row, exact including ties.

Result (as ``backends/reference/select.py``): the prefix indices ``0..P-1``, then the ``keep`` highest
scoring other tokens in ascending index order; among equal scores the lower index wins.

How: each score becomes an int32 key whose integer order is the float order (NaN largest, ``-0.0 ==
0.0``, as ``torch.sort`` treats them). A 32-step binary search over the key range finds the
``keep``-th largest key ``T`` (each step counts the keys ``>= mid``: ``O(32·N)`` work per row, any
``N``). Every key ``> T`` is selected, plus the first ``keep - count(> T)`` keys equal to ``T`` in index
order; one more pass in index order writes them with a running prefix count (``tl.cumsum``).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import triton
import triton.language as tl

from ..support import implements
from . import _common

# Tokens per block of the in-row loops: bigger rows loop over several blocks. 1024 with 8 warps keeps 4 keys
# per thread (48 registers, 62% occupancy on an H100); 4096 held 16 (125 registers, 25%).
_MAX_BLOCK = 1024


@triton.jit
def _sort_keys(s):
    """int32 keys ordered like the float32 scores ``s``; NaNs (either sign) map to the largest key."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: equal scores tie, as in torch.sort
    bits = s.to(tl.int32, bitcast=True)
    # Positive floats already order as integers; negative ones order reversed, so flip their magnitude.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(s != s, 0x7FFFFFFF, key)


@triton.jit
def _threshold(s_row, M, keep, BLOCK: tl.constexpr):
    """``(T, equal_wanted)`` for the ``M`` candidate scores at ``s_row``: ``T`` is the ``keep``-th largest
    key; every key above ``T`` is selected, and so are the first ``equal_wanted`` keys equal to ``T``."""
    offs = tl.arange(0, BLOCK)
    # Binary search for T, the keep-th largest key: invariant count(key >= lo) >= keep.
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        count = tl.zeros((), tl.int32)
        for start in range(0, M, BLOCK):
            m = start + offs < M
            key = _sort_keys(tl.load(s_row + start + offs, mask=m, other=0.0).to(tl.float32))
            count += tl.sum((m & (key.to(tl.int64) >= mid)).to(tl.int32), axis=0)
        take = count >= keep
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    threshold = lo

    above = tl.zeros((), tl.int32)
    for start in range(0, M, BLOCK):
        m = start + offs < M
        key = _sort_keys(tl.load(s_row + start + offs, mask=m, other=0.0).to(tl.float32)).to(tl.int64)
        above += tl.sum((m & (key > threshold)).to(tl.int32), axis=0)
    return threshold, keep - above  # equal_wanted >= 1 by the choice of T


@triton.jit
def _selected(key, valid, threshold, equal_wanted, equal_seen):
    """Which keys of one block of candidates (``valid``, in index order) are selected, given ``equal_seen``
    keys equal to ``T`` in the blocks before; returns (selected mask, count of keys equal to ``T`` here)."""
    is_equal = (valid & (key == threshold)).to(tl.int32)
    equal_before = equal_seen + tl.cumsum(is_equal, axis=0) - is_equal
    chosen = (valid & (key > threshold)) | ((is_equal != 0) & (equal_before < equal_wanted))
    return chosen, tl.sum(is_equal, axis=0)


@triton.jit
def _select_kernel(scores_ptr, out_ptr, N, M, keep, P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = scores_ptr + row * N + P  # the M = N - P candidate scores of this row
    o_row = out_ptr + row * (P + keep)
    offs = tl.arange(0, BLOCK)
    threshold, equal_wanted = _threshold(s_row, M, keep, BLOCK)

    # Prefix tokens first, then the selected ones in index order.
    for start in range(0, P, BLOCK):
        m = start + offs < P
        tl.store(o_row + start + offs, (start + offs).to(tl.int64), mask=m)
    written = tl.zeros((), tl.int32)
    equal_seen = tl.zeros((), tl.int32)
    for start in range(0, M, BLOCK):
        m = start + offs < M
        key = _sort_keys(tl.load(s_row + start + offs, mask=m, other=0.0).to(tl.float32)).to(tl.int64)
        chosen, equal_here = _selected(key, m, threshold, equal_wanted, equal_seen)
        chosen_i = chosen.to(tl.int32)
        slot = written + tl.cumsum(chosen_i, axis=0) - chosen_i
        tl.store(o_row + P + slot, (P + start + offs).to(tl.int64), mask=chosen)
        written += tl.sum(chosen_i, axis=0)
        equal_seen += equal_here


@implements(how="one program per row: binary search over order-preserving keys for the k-th score, then an "
                "ordered prefix-sum pass; any N")
@_common.on_tensor_device
def select_tokens(scores: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """``(B, N)`` float32/float16/bfloat16 scores -> int64 ``(B, num_prefix + keep)`` indices (see the module
    docstring). Not float64: its scores become float32 keys, which could merge distinct scores."""
    scores = scores.contiguous()
    B, N = scores.shape
    M = N - num_prefix
    out = _common.new_output((B, num_prefix + keep), torch.int64, scores.device)
    if B == 0:
        return out
    block = min(_MAX_BLOCK, _common.row_block(max(M, num_prefix)))
    _select_kernel[(B,)](scores, out, N, M, keep, P=num_prefix, BLOCK=block,
                         num_warps=_common.num_warps(block, per_thread=4))
    return out


def resource_launches(s) -> Dict[str, Callable[[], object]]:
    """``{scenario: call}``: this module's launches at the GPU resource report's shape ``s`` (``B, N, D, H, Dh,
    K, F``; ``benchmarks/gpu_resources.py`` records the launches without running them)."""
    return {"ViT-B/16": lambda: select_tokens(torch.zeros(s.B, s.N), s.K - 1, 1),
            "N=4097": lambda: select_tokens(torch.zeros(s.B, 4097), 2048, 1)}  # rows past one cached tile
