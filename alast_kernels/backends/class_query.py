"""The class-query vectors of the scoring identity (docs/alast.md, "Scoring without projecting every key"),
shared by every backend's ``cls_scores``.

``q_cls · k_n = norm1(x_n) · (W_kᵀ q_cls) + b_k · q_cls`` per head, and with
``norm1(x_n) = γ ⊙ x̂_n + β`` (``x̂_n`` the standardised token) the logit of token ``n`` in head ``h`` is
``x̂_n · u[h] + c[h]`` with ``u[h] = scale · γ ⊙ (W_kᵀ q_cls)[h]`` and ``c[h]`` the same for every token. The
softmax over tokens cancels ``c``, so one ``D``-vector per image and head, ``u``, gives all ``N`` scores:
``softmax_n(x̂_n · u[h])``, averaged over heads.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def class_query_vectors(x: torch.Tensor, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                        qkv_weight: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, eps: float,
                        scale: float, q_norm: Optional[Callable], dtype: torch.dtype) -> torch.Tensor:
    """``u``: ``(B, H, D)`` in ``dtype`` (float32, or float64 for a float64 oracle), without gradient.

    x: ``(B, N, D)``; norm_weight/norm_bias: ``norm1``'s ``(D,)`` or ``None``; qkv_weight ``(3·D, D)``;
    qkv_bias ``(3·D,)`` or ``None``; ``q_norm`` the block's query norm (applied in ``x``'s dtype, as the
    block applies it) or ``None``. Computed with autocast off: under autocast the small matmuls would
    otherwise run in 16 bits and ``u`` would come back in 16 bits.
    """
    B, _, D = x.shape
    H = num_heads
    cast = (lambda t: None if t is None else t.detach().to(dtype))
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        w = qkv_weight.detach().to(dtype)
        b = cast(qkv_bias)
        cls = F.layer_norm(x[:, 0].detach().to(dtype), (D,), cast(norm_weight), cast(norm_bias), eps)
        q = F.linear(cls, w[:D], None if b is None else b[:D]).view(B, H, D // H)
        if q_norm is not None:
            q = q_norm(q.to(x.dtype)).to(dtype)
        u = torch.einsum("bhe,hed->bhd", q, w[D:2 * D].view(H, D // H, D)) * scale
        if norm_weight is not None:
            u = u * cast(norm_weight)
        return u.contiguous()
