"""``query_attention``: a few queries over many keys and values (SynQT's knowledge extraction).

Kept in its own module and re-exported by :mod:`alast_kernels.ops`, whose conventions it follows: the
arguments are checked here, for every backend, before the chosen implementation runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend as _backend
from . import _checks


def query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Attention of ``Tq`` queries over ``Nk`` keys and values, ``Tq ≪ Nk``: ``softmax(q kᵀ · scale) v``.

    q: ``(B, H, Tq, Dh)``; k, v: ``(B, H, Nk, Dh)``, same dtype and device, at least one query, key and
    channel; any strides. ``scale``: a finite number > 0, default ``Dh ** -0.5``. Returns ``(B, H, Tq, Dh)``
    in the dtype of ``q``. Gradients go to every input that requires grad: to the queries only when k and v
    are constants (SynQT's frozen backbone's keys and values), to all three, correctly, otherwise. Why an op
    of its own: docs/methods/synqt.md, "The query-attention op".
    """
    scale = _checks.attention_inputs(q, k, v, scale)
    Tq, Dh = q.shape[2], q.shape[3]
    impl = _backend.implementation("query_attention", q.device, q.dtype, head_dim=int(Dh), queries=int(Tq))
    return impl(q, k, v, scale)
