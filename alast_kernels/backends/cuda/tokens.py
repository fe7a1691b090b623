"""gather_tokens / scatter_tokens on the ``alast::`` row-copy kernels, through the shared autograd Functions
of :mod:`alast_kernels.backends.autograd`.

gather backward is ``alast::gather_tokens_backward`` (rows summed per target token, no atomics; repeated
indices accumulate); scatter backward is the identity for ``x`` and a gather for ``delta``.
"""
import torch

from ..autograd import gather_function, scatter_function
from ..support import implements

GatherTokensFunction = gather_function(torch.ops.alast.gather_tokens, torch.ops.alast.gather_tokens_backward,
                                       "GatherTokensFunction")
ScatterTokensFunction = scatter_function(torch.ops.alast.scatter_tokens, torch.ops.alast.gather_tokens,
                                         "ScatterTokensFunction")


@implements(how="16-byte row copy; backward without atomics")
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, N, D)`` float32/float16/bfloat16, int64 ``idx (B, K)`` -> ``(B, K, D)``."""
    return GatherTokensFunction.apply(x, idx)


@implements(how="one write per output row, 16-byte vectors")
def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x (B, N, D)``, int64 ``idx (B, K)`` unique per row, ``delta (B, K, D)`` -> ``(B, N, D)``."""
    return ScatterTokensFunction.apply(x, idx, delta)
