"""Attention of a few queries over many keys and values (the reference: PyTorch's SDPA).

Autograd gives every input that requires grad its gradient: the queries only when the keys and values
are constants (SynQT's case: the frozen backbone's keys and values), all three otherwise.
"""
import torch
import torch.nn.functional as F

from ..support import implements


@implements(how="SDPA", vendor="PyTorch SDPA")
def query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v``: q ``(B, H, Tq, Dh)``, k/v ``(B, H, Nk, Dh)`` -> ``(B, H, Tq, Dh)``."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
