"""``sparse_tuning``: Sparse-Tuning (Liu et al., arXiv 2405.14700) — a frozen ViT thinned by the token fuse,
with a trainable Dense Adapter beside every block's MLP; only the adapters and the head train.

Block ``l`` (post-attention, post-fuse tokens ``x'_l``) adds to its output
``DA_l = W_up · ReLU(W_d1 · x'_l + Σ_k W_dk · S(DA_{l−k}))`` for the dense links ``k`` (default 1 and 3,
where block ``l−k`` exists); ``S`` applies the token fuses since block ``l−k`` to that adapter's output, so its
tokens line up with ``x'_l``. ``W_up`` starts at zero, so the model starts as the frozen backbone with the
token fuse. See docs/methods/sparse-tuning.md.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..vit import head_parameters, model_blocks
from .._validate import check_distinct_ints, check_int
from .base import Method, register, set_trainable
from .token_fuse import TokenFuseViT

__all__ = ["SparseTuning", "DenseAdapter", "SparseTuningViT"]


class DenseAdapter(nn.Module):
    """``W_up · ReLU(W_d1 · x + Σ_k W_dk · earlier_k)``: ``D -> r -> D`` with dense links to earlier adapters.

    Args:
        dim: ``D``; bottleneck: ``r``; links: the offsets ``k`` of the earlier adapters it reads (each gets
            its own bias-free ``D -> r`` projection; one bias, on ``W_d1``, serves the sum).
    Parameters: ``down`` (``W_d1``), ``link_down[i]`` (the projection of the adapter ``links[i]`` blocks back:
    ``W_d2`` for 1 and ``W_d3`` for 3 in the paper's naming), ``up`` (``W_up``, zero at creation). Down
    projections keep ``nn.Linear``'s initialisation; biases start at zero.
    """

    def __init__(self, dim: int, bottleneck: int, links: Sequence[int]):
        super().__init__()
        self.links = tuple(links)
        self.down = nn.Linear(dim, bottleneck)
        self.link_down = nn.ModuleList(nn.Linear(dim, bottleneck, bias=False) for _ in self.links)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
        """x: ``(B, N, D)``; history: earlier adapters' outputs ``(B, N, D)``, the latest last
        (``history[-k]`` is the adapter ``k`` blocks back). Returns ``(B, N, D)``."""
        h = self.down(x)
        for k, proj in zip(self.links, self.link_down):
            h = h + proj(history[-k])
        return self.up(F.relu(h))


class SparseTuningViT(TokenFuseViT):
    """:class:`TokenFuseViT` with a frozen backbone, a :class:`DenseAdapter` beside every block's MLP, and
    optionally a non-affine BatchNorm between the pooled features and the classifier.

    ``adapters[l]`` reads the adapters ``k`` blocks back for each ``k`` in ``dense_links`` with ``k <= l``.
    """

    def __init__(self, vit: VisionTransformer, fuse_layers: Sequence[int], keep_rate: float, adapter_dim: int,
                 dense_links: Sequence[int], head_batchnorm: bool):
        super().__init__(vit, fuse_layers, keep_rate, train_backbone=False)
        reference = next(vit.parameters())
        dim = vit.embed_dim
        self.dense_links = tuple(dense_links)
        self.reach = max(self.dense_links, default=0)  # how many earlier adapter outputs a block may read
        self.adapters = nn.ModuleList(
            DenseAdapter(dim, adapter_dim, [k for k in self.dense_links if k <= layer])
            for layer in range(len(model_blocks(vit)))
        ).to(device=reference.device, dtype=reference.dtype)
        self.head_norm = (nn.BatchNorm1d(vit.num_features, affine=False).to(reference.device, reference.dtype)
                          if head_batchnorm else None)

    def beside_mlp(self, layer: int, x: torch.Tensor,
                   carried: List[torch.Tensor]) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        adapter_out = self.adapters[layer](x, carried)
        return adapter_out, (carried + [adapter_out])[-self.reach:] if self.reach else []

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.head_norm is None:
            return super().logits(tokens)
        vit = self.vit
        features = vit.forward_head(vit.norm(tokens), pre_logits=True)
        return vit.head(self.head_norm(features))


@register
class SparseTuning(Method):
    """Sparse-Tuning over a timm ViT: frozen backbone with the token fuse, Dense Adapters and head train.

    Args:
        model: a timm ``VisionTransformer`` or a wrapper holding one (DDP, peft, ...). Its blocks are
            converted to :class:`~alast_kernels.ViTBlock` in place; :attr:`model` is a new module around it.
        keep_rate: ρ, the fraction of the current non-prefix tokens each fuse block keeps (training and
            inference alike).
        fuse_layers: the fuse blocks (0-based); ``None``: ``round(L/4)·{1, 2, 3}`` (3, 6, 9 of 12).
        adapter_dim: the adapters' bottleneck ``r``.
        dense_links: offsets of the earlier adapters each adapter reads (the published 1 and 3); ``()``
            gives plain parallel adapters.
        head_batchnorm: put a non-affine ``BatchNorm1d`` between the pooled features and the classifier,
            as the authors' head does. Off by default: the model keeps its own head, so every method in a
            comparison shares it.
    """

    name = "sparse_tuning"
    summary = "frozen ViT thinned by the token fuse; Dense Adapters and the head train"

    def __init__(self, model: nn.Module, keep_rate: float = 0.7, fuse_layers: Optional[Sequence[int]] = None,
                 adapter_dim: int = 32, dense_links: Sequence[int] = (1, 3), head_batchnorm: bool = False):
        super().__init__(model)
        adapter_dim = check_int("adapter_dim", adapter_dim, 1)
        links = check_distinct_ints("dense_links", dense_links, 1, what="block offsets")
        self.model = SparseTuningViT(self.vit, fuse_layers, keep_rate, adapter_dim, links, bool(head_batchnorm))
        set_trainable(self.model, [*self.model.adapters.parameters(), *head_parameters(self.vit)])
