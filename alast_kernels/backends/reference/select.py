"""Top-k token selection: prefix tokens first, then the best-scoring others, in ascending index order."""
import torch

from ..support import implements


@implements(how="stable sort")
def select_tokens(scores: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    B = scores.shape[0]
    # A stable descending sort keeps equal scores in index order, so ties go to the lower index.
    order = torch.sort(scores[:, num_prefix:], dim=1, descending=True, stable=True).indices
    chosen = order[:, :keep].sort(dim=1).values + num_prefix
    prefix = torch.arange(num_prefix, device=scores.device, dtype=torch.int64).expand(B, num_prefix)
    return torch.cat([prefix, chosen], dim=1)
