"""``query_attention``: a few queries over many keys and values (SynQT's knowledge extraction).

Kept in its own module and re-exported by :mod:`alast_kernels.ops`, whose conventions it follows: the
arguments are checked here, for every backend, before the chosen implementation runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backend as _backend
from . import _checks


def query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Attention of ``Tq`` queries over ``Nk`` keys and values, ``Tq ≪ Nk``: ``softmax(q kᵀ · scale) v``.

    q: ``(B, H, Tq, Dh)``; k, v: ``(B, H, Nk, Dh)``, same dtype and device; any strides. ``scale``
    defaults to ``Dh ** -0.5``. Returns ``(B, H, Tq, Dh)`` in the dtype of ``q``. Gradients go to every
    input that requires grad: to the queries only when k and v are constants (a frozen backbone's keys
    and values), to all three, correctly, otherwise.
    """
    _checks.tensor("q", q, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        _checks.tensor(name, t, ndim=4, device=q.device)
        _checks.same_dtype(name, t, "q", q)
    B, H, Tq, Dh = q.shape
    _checks.shape("k", k, (B, H, k.shape[2], Dh))
    _checks.shape("v", v, tuple(k.shape))
    if Tq == 0 or k.shape[2] == 0 or Dh == 0:
        raise ValueError(f"q, k: expected at least one query, key and channel, got Tq={Tq}, Nk={k.shape[2]}, "
                         f"Dh={Dh}")
    if scale is None:
        scale = Dh ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a finite number > 0 or None, got {scale!r}")
    impl = _backend.implementation("query_attention", q.device, q.dtype, head_dim=int(Dh), queries=int(Tq))
    return impl(q, k, v, float(scale))
