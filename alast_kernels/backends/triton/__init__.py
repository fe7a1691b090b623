"""The triton backend: fused Triton kernels for every ALaST op (docs/ops.md).

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (the Triton interpreter; that is how
tests exercise the kernels without a GPU). Implementations take arguments already checked by
:mod:`alast_kernels.ops`, and each declares beside its code what it runs (``@implements``: float32/float16/
bfloat16; attention up to head dim 128; scores without ``k_norm``): the dispatcher sends anything else to
another backend. :data:`OPS` and :data:`SUPPORTS` are collected from those declarations.

One module per op family: ``scores`` (class-token scores), ``select`` (top-k), ``tokens`` (gather,
scatter, gather + LayerNorm), ``fuse`` (token fuse), ``attention`` (flash forward/backward),
``query_attention`` (few queries over many keys), ``mlp`` (budget-masked MLP).
"""
from typing import Optional

from ..support import Supports, collect
from ._common import interpreting

DEVICES_NOTE = "CUDA tensors; CPU tensors under `TRITON_INTERPRET=1`"
DEFAULT_SUPPORT = Supports(devices=("cuda", "cpu"))
OPS, SUPPORTS = collect(__name__, DEFAULT_SUPPORT)
globals().update(OPS)  # each implementation also by its op's name: `triton.attention(...)`


def device_refusal(device_type: str) -> Optional[str]:
    """CUDA tensors; CPU tensors only under the Triton interpreter."""
    if device_type == "cpu" and not interpreting():
        return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
    return None
