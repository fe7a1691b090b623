"""One call of every op as a training step makes it, for each backend: what the GPU check times
(``gpu_ops.py``) and runs under compute-sanitizer (``gpu_sanitize.py``).

Each case is a closure running the op's forward and, for ops that carry gradients in a training step, its
backward; the inputs are built once per shape and dtype, as the blocks lay them out (``q, k, v`` are views
of one ``qkv`` projection; ALaST keeps ``keep`` of the ``N - 1`` patches plus the class token).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict

import torch


@dataclass(frozen=True)
class Shape:
    """A ViT's token shapes: batch ``B``, tokens ``N`` (class token included), width ``D``, ``H`` heads,
    ``keep`` patches kept by ALaST (``K = keep + 1`` tokens with the class token), ``queries`` of SynQT."""
    name: str
    B: int
    N: int
    D: int
    H: int
    keep: int
    queries: int = 4

    def as_dict(self) -> dict:
        return asdict(self)


# ViT-B/16 and ViT-S/16 at 224 px, batch 128, half of the 196 patches kept.
SHAPES: Dict[str, Shape] = {
    "vit_b16": Shape("vit_b16", B=128, N=197, D=768, H=12, keep=98),
    "vit_s16": Shape("vit_s16", B=128, N=197, D=384, H=6, keep=98),
}
# Small enough for compute-sanitizer and CPU dry runs; 37 tokens and width 96 are no multiple of any tile.
TINY = Shape("tiny", B=2, N=37, D=96, H=2, keep=16)
# Rows of 180 bytes in 16-bit dtypes: no multiple of 16, so the CUDA kernels' scalar (unvectorised) paths.
ODD_WIDTH = Shape("odd_width", B=2, N=37, D=90, H=2, keep=16)
DTYPES: Dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Ops whose calls in a training step take no gradient (scores and the selection they feed).
FORWARD_ONLY = ("select_tokens", "cls_scores")


def _backward(out, inputs):
    """Backward of ``out`` (a tensor or a tuple of them) into ``inputs`` with a ones gradient."""
    outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(t) for t in outs], inputs=inputs)


def op_calls(ops: Dict[str, Callable], shape: Shape, dtype: torch.dtype, device="cuda") -> Dict[str, Callable]:
    """``{case: closure}`` for every op of ``ops`` (a backend's ``OPS``) at ``shape`` in ``dtype``; a case is
    named after its op (:func:`op_of`), with ``+variant`` where an op is called in two ways."""
    gen = torch.Generator(device=device).manual_seed(0)
    B, N, D, H, P = shape.B, shape.N, shape.D, shape.H, 1
    K, Dh = shape.keep + P, shape.D // shape.H

    def randn(*size, scale=1.0, grad=False):
        t = torch.randn(*size, device=device, dtype=dtype, generator=gen) * scale
        return t.requires_grad_(grad)

    x = randn(B, N, D, grad=True)
    scores = torch.rand(B, N, device=device, generator=gen).softmax(dim=1)
    idx = torch.cat([torch.zeros(B, P, dtype=torch.int64, device=device),
                     scores[:, P:].topk(shape.keep, dim=1).indices.sort(dim=1).values + P], dim=1)
    delta = randn(B, K, D, grad=True)
    ln_w, ln_b = randn(D, grad=True), randn(D, grad=True)
    qkv_w, qkv_b = randn(3 * D, D, scale=D ** -0.5), randn(3 * D)
    kept_qkv = randn(B, K, 3, H, Dh, grad=True)
    q, k, v = kept_qkv.permute(2, 0, 3, 1, 4).unbind(0)
    queries = randn(B, H, shape.queries, Dh, grad=True)
    frozen_k, frozen_v = randn(B, H, N, Dh), randn(B, H, N, Dh)
    h = randn(B, K, D, grad=True)
    fc1_w, fc1_b = randn(4 * D, D, scale=D ** -0.5, grad=True), randn(4 * D, grad=True)
    fc2_w, fc2_b = randn(D, 4 * D, scale=(4 * D) ** -0.5, grad=True), randn(D, grad=True)
    scale = Dh ** -0.5

    calls = {
        "select_tokens": lambda: ops["select_tokens"](scores, shape.keep, P),
        "gather_tokens": lambda: _backward(ops["gather_tokens"](x, idx), [x]),
        "scatter_tokens": lambda: _backward(ops["scatter_tokens"](x, idx, delta), [x, delta]),
        "gather_layer_norm": lambda: _backward(ops["gather_layer_norm"](x, idx, ln_w, ln_b, 1e-6), [x, ln_w, ln_b]),
        "attention": lambda: _backward(ops["attention"](q, k, v, scale, False), [kept_qkv]),
        "attention+cls": lambda: _backward(ops["attention"](q, k, v, scale, True), [kept_qkv]),
        "cls_scores": lambda: ops["cls_scores"](x.detach(), ln_w.detach(), ln_b.detach(), qkv_w, qkv_b, H, 1e-6,
                                                scale, None, None),
        "masked_linear": lambda: _backward(ops["masked_linear"](h, fc1_w, fc1_b, True), [h, fc1_w, fc1_b]),
        "masked_mlp": lambda: _backward(ops["masked_mlp"](h, fc1_w, fc1_b, fc2_w, fc2_b, True, "none"),
                                        [h, fc1_w, fc1_b, fc2_w, fc2_b]),
        "fuse_tokens": lambda: _backward(ops["fuse_tokens"](x, scores, shape.keep, P), [x]),
        "query_attention": lambda: _backward(ops["query_attention"](queries, frozen_k, frozen_v, scale), [queries]),
    }
    unknown = set(ops) - {op_of(case) for case in calls}
    if unknown:  # a new op must get its case here, or the GPU check would silently leave it out
        raise KeyError(f"gpu_cases.op_calls: no case for op(s) {sorted(unknown)}")
    return {case: call for case, call in calls.items() if op_of(case) in ops}


def op_of(case: str) -> str:
    """The op a case calls: ``"attention+cls"`` (attention returning the class-token row, as the token-fuse
    methods call it) -> ``"attention"``."""
    return case.split("+")[0]


def own_ops(name: str, ops: Dict[str, Callable], reference_ops: Dict[str, Callable]) -> Dict[str, Callable]:
    """The ops of backend ``name`` that are its own (not the reference's function reused, as triton's
    ``masked_linear`` is): the ones worth timing or checking."""
    if name == "reference":
        return dict(ops)
    return {op: fn for op, fn in ops.items() if fn is not reference_ops.get(op)}
