"""The reference backend: pure PyTorch, any device and floating dtype. The oracle for the others.

Implementations take their arguments already checked by :mod:`alast_kernels.ops`.
"""
import torch

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


def supports(device: torch.device) -> bool:
    return True
