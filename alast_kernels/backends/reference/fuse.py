"""Token fuse: keep the prefix and the best-scoring tokens, fold the others into one score-weighted token.

The kept tokens are those :func:`select_tokens` chooses; the fused token sums the dropped tokens only
(gathered first, so a non-finite kept token cannot leak into it through a zero weight). Autograd gives the
backward the contract asks for: gather's backward for the kept rows, ``scores[b, j] · g_fused`` for a
dropped row ``j``.
"""
import torch

from ..support import implements
from .select import select_tokens
from .tokens import gather_tokens


def dropped_tokens(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The token indices not in ``idx`` (int64 ``(B, K)``, unique per row), ascending: int64 ``(B, N - K)``."""
    B, K = idx.shape
    kept = torch.zeros(B, num_tokens, dtype=torch.uint8, device=idx.device).scatter_(1, idx, 1)
    # A stable sort of the 0/1 flags lists the dropped tokens (flag 0) first, each group in index order.
    return torch.sort(kept, dim=1, stable=True).indices[:, :num_tokens - K]


@implements(how="`select_tokens`, gather, score-weighted sum of the dropped tokens")
def fuse_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """``(B, N, D)`` tokens and ``(B, N)`` scores -> ``(B, num_prefix + keep + 1, D)`` in ``x``'s dtype.

    The fused token is computed in float32 (float64 for float64 ``x``) and rounded once; it is an
    elementwise product and sum, which autocast leaves in that precision.
    """
    idx = select_tokens(scores, keep, num_prefix)
    dropped = dropped_tokens(idx, x.shape[1])
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weights = scores.detach().gather(1, dropped).to(compute)  # (B, N - P - keep)
    fused = (weights.unsqueeze(-1) * gather_tokens(x, dropped).to(compute)).sum(1, keepdim=True).to(x.dtype)
    return torch.cat([gather_tokens(x, idx), fused], dim=1)
