"""The triton backend: fused Triton kernels for every ALaST op (DESIGN.md §3).

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter; that is how
tests exercise the kernels without a GPU). Implementations take arguments already checked by
:mod:`alast_kernels.ops` and check what those checks leave open (device, layout) before any launch.
float64 inputs, head dims above 128 and ``k_norm`` scoring run the reference implementation (see each
module's docstring).

One module per op family: ``scores`` (class-token scores), ``select`` (top-k), ``tokens`` (gather,
scatter, gather + LayerNorm), ``fuse`` (token fuse), ``attention`` (flash forward/backward), ``mlp``
(budget-masked MLP).
"""
import os

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
    """CUDA tensors; CPU tensors only under the Triton interpreter."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
