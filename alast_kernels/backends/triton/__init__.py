"""The triton backend: fused Triton kernels for every ALaST op (docs/ops.md).

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter; that is how
tests exercise the kernels without a GPU). Implementations take arguments already checked by
:mod:`alast_kernels.ops`, and :data:`SUPPORTS` declares what each runs (float32/float16/bfloat16; attention
up to head dim 128; scores without ``k_norm``): the dispatcher sends anything else to another backend.

One module per op family: ``scores`` (class-token scores), ``select`` (top-k), ``tokens`` (gather,
scatter, gather + LayerNorm), ``fuse`` (token fuse), ``attention`` (flash forward/backward),
``query_attention`` (few queries over many keys), ``mlp`` (budget-masked MLP).
"""
from dataclasses import replace
from typing import Optional

from ..support import FLOAT_DTYPES, Supports
from ._common import interpreting
from .attention import MAX_HEAD_DIM, attention
from .fuse import fuse_tokens
from .mlp import masked_linear, masked_mlp
from .query_attention import MAX_QUERIES, query_attention
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

DEVICES_NOTE = "CUDA tensors; CPU tensors under `TRITON_INTERPRET=1`"
DEFAULT_SUPPORT = Supports(devices=("cuda", "cpu"))
SUPPORTS = {
    "select_tokens": replace(DEFAULT_SUPPORT, how="one program per row: binary search over order-preserving "
                                                  "keys for the k-th score, then an ordered prefix-sum pass; any N"),
    "gather_tokens": replace(DEFAULT_SUPPORT, how="row copy; backward atomic scatter-add (repeated indices "
                                                  "allowed)"),
    "scatter_tokens": replace(DEFAULT_SUPPORT, how="inverse index map, one write per row"),
    "gather_layer_norm": replace(DEFAULT_SUPPORT, how="fused gather + LayerNorm, fused backward"),
    "attention": replace(DEFAULT_SUPPORT, max_head_dim=MAX_HEAD_DIM,
                         how="flash forward/backward, any token count, class-token row from the saved "
                             "logsumexp"),
    "cls_scores": replace(DEFAULT_SUPPORT, k_norm=False, how="one read of `x`: LayerNorm statistics, H logits, "
                                                             "softmax, head mean"),
    # No elementwise part to fuse: the reference's autograd.Function (cuBLAS), any dtype.
    "masked_linear": replace(DEFAULT_SUPPORT, dtypes=FLOAT_DTYPES, how="the reference's own: cuBLAS, nothing to "
                                                                       "fuse"),
    "masked_mlp": replace(DEFAULT_SUPPORT, how="cuBLAS matmuls + Triton GELU forward/backward kernels"),
    "fuse_tokens": replace(DEFAULT_SUPPORT, how="one pass over `x`: the row's selection from the scores, kept rows "
                                                "copied, the rest summed into the fused token; backward one pass, "
                                                "no atomics"),
    "query_attention": replace(DEFAULT_SUPPORT, max_head_dim=MAX_HEAD_DIM, max_queries=MAX_QUERIES,
                               how="all queries in one tile, one pass over keys and values; backward with "
                                   "key/value gradients only when they are needed"),
}


def device_refusal(device_type: str) -> Optional[str]:
    """CUDA tensors; CPU tensors only under the Triton interpreter."""
    if device_type == "cpu" and not interpreting():
        return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
    return None
