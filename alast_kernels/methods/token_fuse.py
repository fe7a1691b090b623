"""The token-fuse ViT that ``sparse_tuning`` and ``evit`` run (docs/methods/sparse-tuning.md, docs/methods/evit.md).

:class:`TokenFuseViT` runs a timm ``VisionTransformer`` block by block from :class:`~alast_kernels.ViTBlock`'s
parts. In a fuse block, after the attention residual, the tokens are thinned with ``ops.fuse_tokens``: the
prefix and the ``ceil(ρ·(N−P))`` non-prefix tokens the class token attends to most (head mean of its
attention row in that block) stay, the rest are folded into one extra token weighted by those scores. The
thinning is progressive: later blocks see only the remaining tokens, and at the next fuse block the fused
token is an ordinary candidate. A subclass may add a branch beside each block's MLP (Sparse-Tuning's Dense
Adapters) and carry tensors from block to block that are fused along with the tokens.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .. import ops
from ..block import keep_count
from ..convert import convert
from .._validate import check_distinct_ints, check_fraction
from ..vit import embed, head, model_blocks, num_prefix_tokens

__all__ = ["TokenFuseViT", "default_fuse_layers", "check_fuse_layers"]


def default_fuse_layers(depth: int) -> Tuple[int, ...]:
    """Blocks ``r, 2r, 3r`` with ``r = round(depth / 4)`` (halves rounded up), those below ``depth``:
    3, 6, 9 for 12 blocks; 1, 2, 3 for 4."""
    r = math.floor(depth / 4 + 0.5)
    return tuple(sorted({r * i for i in (1, 2, 3) if r * i < depth}))


def check_fuse_layers(layers: Optional[Sequence[int]], depth: int) -> Tuple[int, ...]:
    """Distinct block indices in ``[0, depth)``, sorted; ``None`` gives :func:`default_fuse_layers`."""
    if layers is None:
        return default_fuse_layers(depth)
    return check_distinct_ints("fuse_layers", layers, 0, depth, what="block indices", optional=True)


class TokenFuseViT(nn.Module):
    """A timm ``VisionTransformer`` with the token fuse after the attention of the blocks in ``fuse_layers``.

    ``forward(images)``: ``(B, C, H, W)`` -> ``(B, num_classes)`` logits, through ``vit``'s own embedding,
    blocks (as :class:`~alast_kernels.ViTBlock`, converted in place) and head.

    Attributes:
        keep_rate: ρ, the fraction of the current non-prefix tokens a fuse block keeps, in eval mode and by
            default in training; a block where ``ceil(ρ·(N−P))`` keeps them all fuses nothing (adds no token).
        training_keep_rate: the rate used in training mode (EViT's schedule moves it; else ``keep_rate``).
        train_backbone: whether the ViT's blocks give their parameters gradients. ``False`` runs them with
            only what the input gradient needs saved (parameters of other modules still train).
    """

    def __init__(self, vit: VisionTransformer, fuse_layers: Sequence[int], keep_rate: float,
                 train_backbone: bool):
        super().__init__()
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("model: the token fuse scores tokens by the class token's attention, and this ViT "
                             "has no class token (class_token=False)")
        convert(vit)
        self.vit = vit
        self.fuse_layers = check_fuse_layers(fuse_layers, len(model_blocks(vit)))
        self.keep_rate = check_fraction("keep_rate", keep_rate)
        self.training_keep_rate = self.keep_rate
        self.train_backbone = bool(train_backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        P = num_prefix_tokens(vit)
        rate = self.training_keep_rate if self.training else self.keep_rate
        train = self.train_backbone
        x = embed(vit, images)
        carried: List[torch.Tensor] = []
        for layer, blk in enumerate(model_blocks(vit)):
            a, scores = blk.attend(x, train, return_cls=layer in self.fuse_layers)
            x = x + a
            if scores is not None:
                keep = keep_count(rate, x.shape[1] - P)
                if keep < x.shape[1] - P:
                    x, *carried = (ops.fuse_tokens(t, scores, keep, P) for t in (x, *carried))
            out = x + blk.feed_forward(x, train)
            branch, carried = self.beside_mlp(layer, x, carried)
            x = out if branch is None else out + branch
        return self.logits(x)

    def beside_mlp(self, layer: int, x: torch.Tensor,
                   carried: List[torch.Tensor]) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        """A branch block ``layer`` adds to its output beside the MLP, computed from its post-attention
        (post-fuse) tokens ``x`` ``(B, N', D)``, and the tensors to carry to later blocks (each ``(B, N', ·)``,
        fused along with the tokens). Here none: the plain token-fuse block."""
        return None, carried

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ViT's own final norm, pooling and classifier on the last block's output."""
        return head(self.vit, tokens)
