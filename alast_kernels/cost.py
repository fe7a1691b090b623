"""An analytic count of a training step's FLOPs under an ALaST plan (docs/alast.md, "Compute budgets").

The count is what ``torch.utils.flop_counter.FlopCounterMode`` reports for the reference backend (matrix
products, convolutions, attention; element-wise work is not counted), per image, from the plan's token
counts and each block's kind of step:

- a *trained* block: forward, and in backward both the input and the weight gradients;
- a *frozen* block that passes a gradient down: forward, and in backward the input gradient only (its
  attention backward is the full one, since the queries, keys and values all depend on the input: it
  recomputes ``q·kᵀ`` and then takes four more products, 2.5 times the attention's forward);
- a block with *no graph*: forward only.

``tests/test_cost.py`` checks the count against FlopCounterMode over whole steps. Adapters (LoRA) are not
counted: a trained block is counted with full weight gradients, so an ``alast+lora`` plan stays under its
budget by more than a full-weight one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

__all__ = ["ViTDims", "step_flops", "flop_fraction"]


@dataclass(frozen=True)
class ViTDims:
    """The sizes of a timm ``VisionTransformer`` the count needs."""
    num_patches: int
    num_prefix: int
    width: int
    hidden: int        # the MLP's hidden width
    heads: int
    classes: int       # the head's outputs (0 without a head)
    patch_flops: int   # per image, the patch embedding's forward

    @classmethod
    def of(cls, vit: nn.Module) -> "ViTDims":
        """The sizes of ``vit``; ``NotImplementedError`` for a block MLP without an ``fc1`` linear layer."""
        blk = vit.blocks[0]
        fc1 = getattr(blk.mlp, "fc1", None)
        if not isinstance(fc1, nn.Module) or not hasattr(fc1, "out_features"):
            raise NotImplementedError(f"flop_budget: the FLOP count knows timm's Mlp (fc1, fc2), not "
                                      f"{type(blk.mlp).__name__}")
        proj = vit.patch_embed.proj
        Np = int(vit.patch_embed.num_patches)
        # The classifier: the head itself, or the linear layer inside a wrapper (peft's modules_to_save).
        head = next((m for m in vit.head.modules() if isinstance(m, nn.Linear)), None)
        return cls(num_patches=Np, num_prefix=int(vit.num_prefix_tokens), width=int(vit.embed_dim),
                   hidden=int(fc1.out_features), heads=int(blk.attn.num_heads),
                   classes=0 if head is None else int(head.out_features),
                   patch_flops=2 * Np * proj.weight.numel())


def _block(d: ViTDims, tokens: int, kept: int, train: bool, grad_input: bool, mode: str, selects: bool) -> int:
    """One block's FLOPs per image. ``tokens``: its input's token count (prefix included); ``kept``: the tokens
    it computes on (carry: the selected ones; drop: all of its input)."""
    D = d.width
    linear = 2 * kept * (4 * D * D + 2 * D * d.hidden)  # qkv, proj, fc1, fc2
    attention = 4 * kept * kept * D                     # q·kᵀ and p·v over all heads
    if mode == "drop":
        scoring = 2 * tokens * D                         # the class-token row beside the attention
    else:
        scoring = (4 * D * D + 2 * tokens * D * d.heads) if selects else 0  # class query, then every logit
    forward = linear + attention + scoring
    # Attention's backward recomputes q·kᵀ, then four products: 2.5 times its forward.
    attention_backward = 5 * attention // 2
    if train:
        return forward + 2 * linear + attention_backward
    if grad_input:
        return forward + linear + attention_backward
    return forward


def step_flops(d: ViTDims, processed: Sequence[int], train: Sequence[bool], grad_input: Sequence[bool],
               train_embeddings: bool, tokens: str = "carry") -> int:
    """FLOPs per image of one planned training step (forward and backward).

    processed: the non-prefix tokens each block processes; train, grad_input: the plan's flags per block;
    tokens: ``"carry"`` or ``"drop"``. In drop mode ``processed`` must not grow through depth (block ``l``'s
    input is what block ``l-1`` passed on); a block whose successor processes fewer tokens selects.
    """
    P, Np = d.num_prefix, d.num_patches
    total = d.patch_flops * (2 if train_embeddings else 1)  # the images need no gradient
    for k, t, g in zip(processed, train, grad_input):
        if tokens == "drop":
            n = P + k  # its whole input
            total += _block(d, n, n, t, g, "drop", selects=False)
        else:
            total += _block(d, P + Np, P + k, t, g, "carry", selects=k < Np)
    head = 2 * d.width * d.classes
    below = train_embeddings or any(train)  # does the head's input need a gradient?
    return total + head * (3 if below else 2)


def flop_fraction(d: ViTDims, processed: Sequence[int], train: Sequence[bool], grad_input: Sequence[bool],
                  train_embeddings: bool, tokens: str = "carry") -> float:
    """:func:`step_flops` as a fraction of full fine-tuning's (every token, every block and embedding trained)."""
    L = len(processed)
    full = step_flops(d, [d.num_patches] * L, [True] * L, [True] * L, True)
    return step_flops(d, processed, train, grad_input, train_embeddings, tokens) / full
