"""Budget maths of docs/alast.md §2, as plain functions on per-layer lists (no model, no state)."""
from __future__ import annotations

from typing import List, Sequence

import torch


def water_fill(budgets: Sequence[float], token_budget: float, min_keep: float) -> List[float]:
    """Keep ratios ``r_l = clip(c · b_l, min_keep, 1)`` with the scale ``c`` chosen so ``mean(r) = token_budget``.

    Requires ``min_keep <= token_budget <= 1``. Budgets at or below zero count as a tiny positive value,
    so every layer can still reach 1 when ``token_budget`` is 1.
    """
    b = [max(float(v), 1e-12) for v in budgets]

    def ratios(c: float) -> List[float]:
        return [min(1.0, max(min_keep, c * v)) for v in b]

    lo, hi = 0.0, 1.0 / min(b)  # mean(ratios(lo)) = min_keep <= token_budget <= 1 = mean(ratios(hi))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(ratios(mid)) / len(b) < token_budget:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return ratios(hi)


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


def paper_update(budgets: Sequence[float], deltas: Sequence[float], previous: Sequence[float],
                 alpha: float) -> List[float]:
    """``b ← clamp(b + α·(Δ_t − Δ_{t−1}), 0, 1)``."""
    return [min(1.0, max(0.0, b + alpha * (d - p))) for b, d, p in zip(budgets, deltas, previous)]
