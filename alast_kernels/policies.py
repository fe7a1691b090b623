"""Budget maths of docs/alast.md §2, as plain functions on per-layer lists (no model, no state)."""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch


def scaled_ratios(budgets: Sequence[float], scale: float, min_keep: float, drop: bool = False) -> List[float]:
    """``r_l = clip(scale · b_l, min_keep, 1)``; with ``drop``, ``r_0 = 1`` and then the running minimum (a
    dropped token cannot come back, and the first block sees every token). Non-decreasing in ``scale``."""
    r = [min(1.0, max(min_keep, scale * max(float(v), 1e-12))) for v in budgets]
    if drop:
        r[0] = 1.0
        for l in range(1, len(r)):
            r[l] = min(r[l], r[l - 1])
    return r


def fill(budgets: Sequence[float], min_keep: float, cost: Callable[[List[float]], float], target: float,
         drop: bool = False, at_most: bool = False) -> List[float]:
    """:func:`scaled_ratios` at the scale where ``cost(ratios)`` reaches ``target`` (found by bisection).

    ``cost`` must be non-decreasing in the ratios, with ``cost(ratios at scale 0) <= target`` and
    ``cost(all ones) >= target``. Without ``at_most`` the ratios at the upper end of the final bracket are
    returned (for a continuous cost, within 1e-15 of ``target``); with ``at_most`` those at the lower end,
    whose cost is at or under ``target`` (for a cost that moves in steps, such as one of token counts).
    Budgets at or below zero count as a tiny positive value, so every layer can still reach 1.
    """
    lo, hi = 0.0, 1.0 / max(min(float(v) for v in budgets), 1e-12)  # hi: every ratio 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cost(scaled_ratios(budgets, mid, min_keep, drop)) <= target if at_most else \
                cost(scaled_ratios(budgets, mid, min_keep, drop)) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return scaled_ratios(budgets, lo if at_most else hi, min_keep, drop)


def water_fill(budgets: Sequence[float], token_budget: float, min_keep: float, drop: bool = False) -> List[float]:
    """Keep ratios ``r_l = clip(c · b_l, min_keep, 1)`` with the scale ``c`` chosen so ``mean(r) = token_budget``
    (with ``drop``, the ratios of :func:`scaled_ratios`).

    Requires ``lowest_mean(L, min_keep, drop) <= token_budget <= 1``.
    """
    return fill(budgets, min_keep, lambda r: sum(r) / len(r), token_budget, drop)


def lowest_mean(num_layers: int, min_keep: float, drop: bool = False) -> float:
    """The lowest mean keep ratio :func:`water_fill` can reach: ``min_keep``, or with ``drop`` (the first block
    keeps every token) ``(1 + (L - 1) · min_keep) / L``."""
    return (1 + (num_layers - 1) * min_keep) / num_layers if drop else min_keep


def top_layers(budgets: Sequence[float], count: int) -> List[bool]:
    """The ``count`` layers with the highest budgets; on equal budgets the deeper layer wins."""
    order = sorted(range(len(budgets)), key=lambda l: (budgets[l], l), reverse=True)
    chosen = set(order[:count])
    return [l in chosen for l in range(len(budgets))]


def sample_layers(budgets: Sequence[float], count: int, generator: torch.Generator) -> List[bool]:
    """``count`` layers drawn without replacement with probability proportional to the budgets."""
    weights = torch.tensor([max(float(v), 0.0) for v in budgets], dtype=torch.float64) + 1e-12
    chosen = set(torch.multinomial(weights, count, replacement=False, generator=generator).tolist())
    return [l in chosen for l in range(len(budgets))]


def alast_update(budgets: Sequence[float], deltas: Sequence[float], alpha: float) -> List[float]:
    """``b ← (1-α)·b + α·L·I`` with ``I = Δ / ΣΔ`` (uniform when every Δ is zero)."""
    L = len(budgets)
    total = sum(deltas)
    importance = [d / total for d in deltas] if total > 0 else [1.0 / L] * L
    return [(1 - alpha) * b + alpha * L * i for b, i in zip(budgets, importance)]


PAPER_START = 0.9       # every budget's first value in the authors' code
PAPER_RANGE = (0.5, 1.0)  # where it clips the budgets after each update


def paper_update(budgets: Sequence[float], deltas: Sequence[float], previous: Sequence[float],
                 alpha: float) -> List[float]:
    """The authors' update: ``b ← clip(b + α·(Δ_t − Δ_{t−1}), 0.5, 1)``."""
    lo, hi = PAPER_RANGE
    return [min(hi, max(lo, b + alpha * (d - p))) for b, d, p in zip(budgets, deltas, previous)]


def softmax_layers(budgets: Sequence[float], count: int, generator: torch.Generator) -> List[bool]:
    """``count`` layers drawn without replacement with probabilities ``softmax(b)`` (the authors' draw)."""
    probabilities = torch.tensor([float(v) for v in budgets], dtype=torch.float64).softmax(0)
    chosen = set(torch.multinomial(probabilities, count, replacement=False, generator=generator).tolist())
    return [l in chosen for l in range(len(budgets))]
