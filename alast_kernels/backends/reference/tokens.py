"""Gather, scatter and gather + LayerNorm of tokens along dim 1, differentiated by autograd."""
import torch
import torch.nn.functional as F

from ..support import implements


def _expand(idx: torch.Tensor, D: int) -> torch.Tensor:
    return idx.unsqueeze(-1).expand(-1, -1, D)


@implements(how="`gather`")
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, _expand(idx, x.shape[2]))


@implements(how="`scatter_add`")
def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return x.scatter_add(1, _expand(idx, x.shape[2]), delta)


@implements(how="gather + `layer_norm`")
def gather_layer_norm(x, idx, weight, bias, eps):
    x_k = gather_tokens(x, idx)
    return x_k, F.layer_norm(x_k, (x.shape[2],), weight, bias, eps)
