"""The ALaST ops: one contract, three backends (docs/ops.md, docs/backends.md, :mod:`alast_kernels.backend`).

Every function here checks its arguments — once, for every backend: backends do not check again — then
runs the implementation that the dispatcher picks from the backends' declarations for the call's device,
dtype and other facts (head dim, ``k_norm``). Shapes use ``B`` batch, ``N`` tokens,
``P`` prefix tokens (class token first, then registers), ``K`` kept tokens, ``D`` channels, ``H`` heads,
``Dh`` head dim.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from .. import backend as _backend
from .._validate import is_int
from ..backends.autograd import compute_dtype as _autocast_dtype
from . import _checks
from ._query_attention import query_attention

__all__ = [
    "select_tokens", "gather_tokens", "scatter_tokens", "gather_layer_norm", "attention", "cls_scores",
    "masked_linear", "masked_mlp", "fuse_tokens", "query_attention",
]

_GELU_APPROXIMATIONS = ("none", "tanh")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What the matmul ops compute in: the autocast dtype under autocast, else ``x``'s."""
    return _autocast_dtype(x) or x.dtype


def select_tokens(scores: torch.Tensor, keep: int, num_prefix: int = 1) -> torch.Tensor:
    """Indices of the prefix tokens and the ``keep`` highest-scoring other tokens of each row.

    scores: ``(B, N)`` floating point. Returns int64 ``(B, num_prefix + keep)``: ``0..num_prefix-1``, then
    the selected tokens, all in ascending index order; equal scores go to the lower index.
    """
    _checks.tensor("scores", scores, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    num_prefix, keep = _checks.prefix_and_keep(num_prefix, keep, scores.shape[1])
    return _backend.implementation("select_tokens", scores.device, scores.dtype)(scores, keep, num_prefix)


def fuse_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int = 1) -> torch.Tensor:
    """The prefix, the ``keep`` highest-scoring other tokens and one token fusing the rest.

    x: ``(B, N, D)`` floating point; scores: ``(B, N)`` floating point on ``x``'s device (the class token's
    attention row; the prefix entries are ignored). Returns ``(B, num_prefix + keep + 1, D)`` in ``x``'s
    dtype: the prefix tokens, the kept tokens in ascending index order (chosen as :func:`select_tokens`
    chooses), then ``Σ_j scores[b, j] · x[b, j]`` over the dropped tokens ``j`` (zero when none is
    dropped). Backward: kept rows get their output gradient, dropped row ``j`` gets ``scores[b, j]`` times
    the fused token's; ``scores`` get no gradient. Contract: ``docs/ops-fuse-tokens.md``.
    """
    _checks.tensor("x", x, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("scores", scores, ndim=2, dtypes=_checks.FLOAT_DTYPES, device=x.device)
    _checks.shape("scores", scores, x.shape[:2])
    num_prefix, keep = _checks.prefix_and_keep(num_prefix, keep, x.shape[1])
    # float64 scores make it a float64 call: their selection must not go through float32 keys.
    impl = _backend.implementation("fuse_tokens", x.device, torch.promote_types(x.dtype, scores.dtype))
    return impl(x, scores.detach(), keep, num_prefix)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, check_indices: bool = True) -> torch.Tensor:
    """``x[b, idx[b]]``: ``(B, N, D)`` and int64 ``(B, K)`` -> ``(B, K, D)``.

    Backward scatter-adds into the gradient of ``x`` (repeated indices accumulate).
    """
    _checks.tensor("x", x, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.indices("idx", idx, "x", x, unique=False, values=check_indices)
    return _backend.implementation("gather_tokens", x.device, x.dtype)(x, idx)


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor, *,
                   check_indices: bool = True) -> torch.Tensor:
    """``x`` with ``delta[b, j]`` added at token ``idx[b, j]``; a new tensor, ``x`` is not modified.

    x: ``(B, N, D)``; idx: int64 ``(B, K)``, unique within each row; delta: ``(B, K, D)``, dtype of ``x``.
    Backward: ``grad_x = grad_out``, ``grad_delta = grad_out[b, idx[b]]``.
    """
    _checks.tensor("x", x, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("delta", delta, ndim=3, device=x.device)
    _checks.same_dtype("delta", delta, "x", x)
    _checks.indices("idx", idx, "x", x, unique=True, values=check_indices)
    _checks.shape("delta", delta, (x.shape[0], idx.shape[1], x.shape[2]))
    return _backend.implementation("scatter_tokens", x.device, x.dtype)(x, idx, delta)


def gather_layer_norm(x: torch.Tensor, idx: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], eps: float = 1e-6, *,
                      check_indices: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gathered tokens and their LayerNorm in one pass: ``(x[b, idx[b]], layer_norm(x[b, idx[b]]))``, both
    ``(B, K, D)``.

    weight, bias: ``(D,)`` or ``None``. Backward adds both outputs' gradients into ``x``'s at ``idx``.
    """
    _checks.tensor("x", x, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _checks.tensor(name, p, ndim=1, device=x.device)
            _checks.shape(name, p, (x.shape[2],))
            _checks.param_dtype(name, p, "x", x, float32_ok=True)
    _checks.indices("idx", idx, "x", x, unique=False, values=check_indices)
    impl = _backend.implementation("gather_layer_norm", x.device, x.dtype)
    return impl(x, idx, weight, bias, float(eps))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
              return_cls: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Softmax attention ``softmax(q kᵀ · scale) v`` per batch and head.

    q: ``(B, H, Nq, Dh)``; k, v: ``(B, H, Nk, Dh)``, same dtype and device, at least one query, key and
    channel. ``scale``: a finite number > 0, default ``Dh ** -0.5``. With ``return_cls`` also returns float32
    ``(B, Nk)``: the head mean of query 0's probability row, without gradient.
    """
    scale = _checks.attention_inputs(q, k, v, scale)
    Dh = q.shape[3]
    impl = _backend.implementation("attention", q.device, q.dtype, head_dim=int(Dh))
    return impl(q, k, v, scale, bool(return_cls))


def cls_scores(x: torch.Tensor, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
               qkv_weight: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int, *,
               eps: float = 1e-6, scale: Optional[float] = None, q_norm: Optional[Callable] = None,
               k_norm: Optional[Callable] = None) -> torch.Tensor:
    """The class token's head-averaged attention row for a whole block input (docs/alast.md §1, step 1).

    x: ``(B, N, D)``; norm_weight/norm_bias: the block's ``norm1`` (LayerNorm) ``(D,)`` or ``None``;
    qkv_weight: ``(3·D, D)``; qkv_bias: ``(3·D,)`` or ``None``. ``q_norm``/``k_norm`` are the
    block's per-head query/key norms (callables on ``(..., Dh)``), ``None`` for none; with a ``k_norm``
    the keys are projected, otherwise the scores come from one ``D``-vector per image and head
    (docs/alast.md, "Scoring without projecting every key"). Returns float32 ``(B, N)`` without gradient;
    each row sums to 1.
    """
    _checks.tensor("x", x, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    D = x.shape[2]
    if not is_int(num_heads) or num_heads < 1 or D % num_heads:
        raise ValueError(f"num_heads: expected a positive int dividing D={D}, got {num_heads!r}")
    num_heads = int(num_heads)
    _checks.tensor("qkv_weight", qkv_weight, ndim=2, device=x.device)
    _checks.shape("qkv_weight", qkv_weight, (3 * D, D))
    for name, p, n in (("norm_weight", norm_weight, D), ("norm_bias", norm_bias, D),
                       ("qkv_bias", qkv_bias, 3 * D)):
        if p is not None:
            _checks.tensor(name, p, ndim=1, device=x.device)
            _checks.shape(name, p, (n,))
    if scale is None:
        scale = (D // num_heads) ** -0.5
    impl = _backend.implementation("cls_scores", x.device, x.dtype, k_norm=k_norm is not None)
    return impl(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, float(eps), float(scale),
                q_norm, k_norm)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  train: bool = True) -> torch.Tensor:
    """``x @ weight.T + bias`` whose backward computes weight gradients only when ``train``.

    x: ``(..., Din)``; weight: ``(Dout, Din)``; bias: ``(Dout,)`` or ``None``. With ``train=False`` the
    parameters get no gradient and nothing is saved for backward but the weight.
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2, device=x.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (weight is {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    _checks.param_dtype("weight", weight, "x", x)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, device=x.device)
        _checks.shape("bias", bias, (weight.shape[0],))
        _checks.param_dtype("bias", bias, "x", x)
    impl = _backend.implementation("masked_linear", x.device, _compute_dtype(x))
    return impl(x, weight, bias, bool(train))


def masked_mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
               fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], train: bool = True,
               approximate: str = "none") -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` whose backward computes weight gradients only when ``train``.

    x: ``(..., D)``; fc1_weight: ``(F, D)``; fc2_weight: ``(Dout, F)``; biases or ``None``.
    ``approximate`` is GELU's (``"none"`` or ``"tanh"``). Frozen (``train=False``): parameters get no
    gradient and only the fc1 output is saved. Trained: the GELU output is recomputed in backward
    instead of being stored.
    """
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("fc1_weight", fc1_weight, ndim=2, device=x.device)
    _checks.tensor("fc2_weight", fc2_weight, ndim=2, device=x.device)
    if x.dim() < 1 or x.shape[-1] != fc1_weight.shape[1]:
        raise ValueError(f"x: expected last dim {fc1_weight.shape[1]} (fc1_weight is "
                         f"{tuple(fc1_weight.shape)}), got shape {tuple(x.shape)}")
    if fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(f"fc2_weight: expected {fc1_weight.shape[0]} input features (fc1's outputs), "
                         f"got shape {tuple(fc2_weight.shape)}")
    for name, p, n in (("fc1_bias", fc1_bias, fc1_weight.shape[0]), ("fc2_bias", fc2_bias, fc2_weight.shape[0])):
        if p is not None:
            _checks.tensor(name, p, ndim=1, device=x.device)
            _checks.shape(name, p, (n,))
    for name, p in (("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight),
                    ("fc2_bias", fc2_bias)):
        if p is not None:
            _checks.param_dtype(name, p, "x", x)
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"approximate: expected one of {_GELU_APPROXIMATIONS}, got {approximate!r}")
    impl = _backend.implementation("masked_mlp", x.device, _compute_dtype(x))
    return impl(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, bool(train), approximate)
