"""select_tokens on the ``alast::select_tokens`` kernel: one thread block per row, radix select in shared
memory, output already in ascending index order (see csrc/select_tokens.cu)."""
import torch

from ..support import implements


@implements(how="radix select in shared memory (N ≤ 4096 cached, longer rows from global memory), output "
                "already ascending")
def select_tokens(scores: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """scores ``(B, N)`` float32/float16/bfloat16 -> int64 ``(B, num_prefix + keep)``; no gradient."""
    return torch.ops.alast.select_tokens(scores.detach().contiguous(), keep, num_prefix)
