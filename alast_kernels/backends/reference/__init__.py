"""The reference backend: pure PyTorch, any device and floating dtype. The oracle for the others.

Implementations take their arguments already checked by :mod:`alast_kernels.ops`.
"""
from dataclasses import replace
from typing import Optional

from ..support import ANY_DEVICE, FLOAT_DTYPES, Supports
from .attention import attention
from .fuse import fuse_tokens
from .mlp import masked_linear, masked_mlp
from .query_attention import query_attention
from .scores import cls_scores
from .select import select_tokens
from .tokens import gather_layer_norm, gather_tokens, scatter_tokens

OPS = {
    "select_tokens": select_tokens,
    "gather_tokens": gather_tokens,
    "scatter_tokens": scatter_tokens,
    "gather_layer_norm": gather_layer_norm,
    "attention": attention,
    "cls_scores": cls_scores,
    "masked_linear": masked_linear,
    "masked_mlp": masked_mlp,
    "fuse_tokens": fuse_tokens,
    "query_attention": query_attention,
}

DEVICES_NOTE = "any device"
DEFAULT_SUPPORT = Supports(devices=ANY_DEVICE, dtypes=FLOAT_DTYPES)
SUPPORTS = {op: replace(DEFAULT_SUPPORT, how=how) for op, how in {
    "select_tokens": "stable sort",
    "gather_tokens": "`gather`",
    "scatter_tokens": "`scatter_add`",
    "gather_layer_norm": "gather + `layer_norm`",
    "attention": "SDPA",
    "cls_scores": "the class-query identity in PyTorch; keys projected with a `k_norm`",
    "masked_linear": "`autograd.Function` over `F.linear`",
    "masked_mlp": "`autograd.Function`, GELU recomputed",
    "fuse_tokens": "`select_tokens`, gather, score-weighted sum of the dropped tokens",
    "query_attention": "SDPA",
}.items()}


def device_refusal(device_type: str) -> Optional[str]:
    """Runs wherever PyTorch does."""
    return None
