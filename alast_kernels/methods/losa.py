"""``losa``: Low-rank Side Adaptation — a small side network refines the frozen ViT's features layer by layer.

A reconstruction from the paper's description (Mercea et al., CVPR 2024, arXiv 2402.02887; no code was
released); ``docs/methods/losa.md`` says what was chosen and why. With ``b_l`` the output of block ``l``
(no gradient) and ``g_l`` a low-rank MLP-Mixer layer::

    a_0 = 0,   a_l = a_{l-1} + g_l(b_l + a_{l-1}),   logits = head(b_L + a_L)

where ``head`` is the ViT's own final norm, pooling, ``fc_norm`` and classifier. Only the side network and
the head train; nothing flows back into the backbone.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..vit import head, head_parameters, model_blocks
from .._validate import check_int
from .base import register, set_trainable
from .frozen_backbone import Features, FrozenBackboneMethod, FrozenBackboneModel, token_count

__all__ = ["LoSA", "LoSAModel", "LowRankMixer", "default_ranks"]


def default_ranks(num_tokens: int, dim: int) -> Tuple[int, int]:
    """``(rank, token_rank)``: the channel MLP's ``D/16`` and the token MLP's ``N/32``, at least 2 each.

    With these the side network is 1–2% of a ViT's parameters (ViT-Ti/S/B at 224², and the job's small
    ViT; ``docs/methods/losa.md`` has the table).
    """
    return max(2, round(dim / 16)), max(2, math.ceil(num_tokens / 32))


class LowRankMixer(nn.Module):
    """``g_l``: a token MLP ``N → r_t → N`` then a channel MLP ``D → r → D``, each after its own LayerNorm
    and on a residual stream; returns the stream's total update, ``(B, N, D)``.

    The up-projections start at zero, so the side network starts at zero (the method starts as a linear
    probe of the last block's output).
    """

    def __init__(self, num_tokens: int, dim: int, rank: int, token_rank: int, eps: float = 1e-6, **dd):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim, eps=eps, **dd)
        self.token_down = nn.Linear(num_tokens, token_rank, **dd)
        self.token_up = nn.Linear(token_rank, num_tokens, **dd)
        self.channel_norm = nn.LayerNorm(dim, eps=eps, **dd)
        self.channel_down = nn.Linear(dim, rank, **dd)
        self.channel_up = nn.Linear(rank, dim, **dd)
        for up in (self.token_up, self.channel_up):
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: ``(B, N, D)`` -> the update ``(B, N, D)`` (zero at initialisation)."""
        # Token mixing as (r_t, N) @ (B, N, D) products: the same maths as the linears applied along the
        # token axis of the transposed tensor, without transposing (copying) two (B, N, D) tensors.
        down, up = self.token_down, self.token_up
        hidden = F.gelu(torch.matmul(down.weight, self.token_norm(u)) + down.bias[:, None])  # (B, r_t, D)
        token_update = torch.matmul(up.weight, hidden) + up.bias[:, None]
        v = u + token_update
        channel_update = self.channel_up(F.gelu(self.channel_down(self.channel_norm(v))))
        return token_update + channel_update


class LoSAModel(FrozenBackboneModel):
    """The frozen ViT plus the side network; features per image: the ``L`` block outputs ``(L, N, D)``."""

    def __init__(self, vit, rank: int, token_rank: int, recompute: bool):
        super().__init__(vit)
        p = next(vit.parameters())
        dd = {"device": p.device, "dtype": p.dtype}
        self.side = nn.ModuleList(LowRankMixer(self.num_tokens, self.dim, rank, token_rank, **dd)
                                  for _ in model_blocks(vit))
        self.recompute = recompute

    def feature_shape(self) -> Tuple[int, ...]:
        return (len(self.side), self.num_tokens, self.dim)

    def backbone_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        x = self.embed_checked(images)
        outputs = []
        for block in model_blocks(self.backbone):
            x = block(x)
            outputs.append(x)
        return outputs

    def from_features(self, features: Features) -> torch.Tensor:
        layers = features.unbind(1) if isinstance(features, torch.Tensor) else features
        if len(layers) != len(self.side):
            raise ValueError(f"features: expected {len(self.side)} layers, got {len(layers)}")
        a: Optional[torch.Tensor] = None
        for b, mixer in zip(layers, self.side):
            u = b if a is None else b + a
            # Recomputing the mixer in backward keeps one (B, N, D) tensor per layer (its input) instead of
            # four, for about 1% more FLOPs (the side network is tiny next to the backbone).
            update = checkpoint(mixer, u, use_reentrant=False) if self.recompute and torch.is_grad_enabled() \
                else mixer(u)
            a = update if a is None else a + update
        return head(self.backbone, layers[-1] + a)


@register
class LoSA(FrozenBackboneMethod):
    """Low-rank side adaptation over a frozen timm ViT.

    Args:
        model: a timm ``VisionTransformer`` (or a module holding one), any depth, width and prefix tokens,
            fixed image size; its classifier head is the method's head.
        rank: the channel MLP's hidden width ``r`` (default ``D/16``).
        token_rank: the token MLP's hidden width ``r_t`` (default ``N/32``).
        recompute: recompute each mixer in backward instead of keeping its activations (default on).

    ``method.model(images, ids=None)`` gives logits; ``ids`` feed the optional feature cache
    (:meth:`enable_feature_cache`). Trainable: the side network, the final norm, ``fc_norm`` and the
    classifier.
    """

    name = "losa"
    summary = ("frozen backbone without a graph; a low-rank side network refines its features; "
               "side network and head train")

    def __init__(self, model: nn.Module, rank: Optional[int] = None, token_rank: Optional[int] = None,
                 recompute: bool = True):
        super().__init__(model)
        vit = self.vit
        num_tokens = token_count(vit)
        default_rank, default_token_rank = default_ranks(num_tokens, int(vit.embed_dim))
        rank = default_rank if rank is None else rank
        token_rank = default_token_rank if token_rank is None else token_rank
        rank = check_int("rank", rank, 1, int(vit.embed_dim))
        token_rank = check_int("token_rank", token_rank, 1, num_tokens)
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute: expected a bool, got {recompute!r}")
        self.rank, self.token_rank = rank, token_rank
        self.model = LoSAModel(vit, rank, token_rank, recompute)
        set_trainable(self.model, [*self.model.side.parameters(), *head_parameters(vit)])
