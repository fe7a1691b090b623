"""select_tokens on the ``alast::select_tokens`` kernel: one thread block per row, radix select in shared
memory, output already in ascending index order (see csrc/select_tokens.cu)."""
import torch

from ..reference.select import select_tokens as _reference


def select_tokens(scores: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """scores ``(B, N)`` -> int64 ``(B, num_prefix + keep)``; indices carry no gradient."""
    if scores.dtype == torch.float64:
        return _reference(scores, keep, num_prefix)
    return torch.ops.alast.select_tokens(scores.detach().contiguous(), keep, num_prefix)
