"""``synqt``: synthesised queries read a frozen ViT's keys and values, layer by layer.

After Lian, Wang, Bai et al., "Parameter-Efficient and Memory-Efficient Tuning for Vision Transformer: A
Disentangled Approach" (ECCV 2024, arXiv 2407.06964); ``docs/methods/synqt.md`` says where this departs
from it. The backbone runs untouched and without a graph; per block ``i`` it leaves its keys and values
``(k_i, v_i)``. A trainable path, per block:

1. **Query synthesis** ``Q_i = S_i(P_i + s_i · pool(Z_{i-1}))``: ``T`` learnable prompt tokens ``P_i``
   plus a learnable scalar times the previous block's pooled output query (not for the first block),
   through a bottleneck MLP, single-head self-attention among the ``T`` queries (q/k/v/out projections
   identity + low rank) and a feed-forward adapter, the last two with learnable mixing scalars.
2. **Knowledge extraction** with block ``i``'s own frozen weights:
   ``A_i = ls1(proj(attn(q = qkv_q(norm1(Q_i)); k_i, v_i)))``, ``Y = Q_i + A_i``,
   ``M_i = ls2(mlp(norm2(Y)))``, ``Z_i = Y + M_i`` — the queries attend to the backbone's tokens only
   (:func:`alast_kernels.ops.query_attention`), never to each other.
3. **Head** over ``1 + 3L`` vectors: the last block's pooled output query ``h_0`` and, per block, the
   pooled ``A_i``, ``M_i``, ``Z_i``; each through a shared LayerNorm and adapter, weighted by
   ``[1, tanh(W h_0)]``, averaged, LayerNorm, the ViT's classifier.

Autograd keeps each block's keys and values (for the queries' attention backward) and the small query
path; the backbone's parameters get no gradient.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from .. import ops
from ..fusion import may_fuse
from ..vit import model_blocks
from .._validate import check_int
from .base import register, set_trainable
from .frozen_backbone import Features, FrozenBackboneMethod, FrozenBackboneModel

__all__ = ["SynQT", "SynQTModel", "QuerySynthesis", "SynQTHead"]


class LowRankMLP(nn.Module):
    """``up(gelu(down(x)))``, ``D → r → D``, the up-projection zero-initialised (starts as zero)."""

    def __init__(self, dim: int, hidden: int, **dd):
        super().__init__()
        self.down = nn.Linear(dim, hidden, **dd)
        self.up = nn.Linear(hidden, dim, **dd)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


class NearIdentity(nn.Module):
    """``x + x A B``: identity plus a rank-``r`` residual, ``B`` zero-initialised (starts as identity)."""

    def __init__(self, dim: int, rank: int, **dd):
        super().__init__()
        self.a = nn.Linear(dim, rank, bias=False, **dd)
        self.b = nn.Linear(rank, dim, bias=False, **dd)
        nn.init.zeros_(self.b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class QueryMixing(nn.Module):
    """Single-head self-attention among the ``T`` queries of one image, ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, rank: int, **dd):
        super().__init__()
        self.q, self.k, self.v, self.out = (NearIdentity(dim, rank, **dd) for _ in range(4))
        self.scale = dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (self.q(x) @ self.k(x).transpose(1, 2) * self.scale).softmax(dim=-1)  # (B, T, T)
        return self.out(p @ self.v(x))


class QuerySynthesis(nn.Module):
    """``S_i``: block ``i``'s ``T`` queries from its prompts and the previous block's pooled output query.

    Returns ``(B, T, D)``, or ``(1, T, D)`` for the first block (no previous query: the same for every image).
    """

    def __init__(self, num_queries: int, dim: int, hidden: int, rank: int, takes_previous: bool, **dd):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(num_queries, dim, **dd))
        nn.init.trunc_normal_(self.prompts, std=0.02)
        # Starts at 0: each block's queries start from its own prompts and learn how much to carry over.
        self.previous_scale = nn.Parameter(torch.zeros((), **dd)) if takes_previous else None
        self.bottleneck = LowRankMLP(dim, hidden, **dd)
        self.mixing = QueryMixing(dim, rank, **dd)
        self.adapter = LowRankMLP(dim, hidden, **dd)
        # Mixing scalars of the self-attention and the adapter. The self-attention's starts at 0 (its
        # near-identity projections are not zero at the start); the adapter's at 1, since its zero
        # up-projection already silences it — a 0 there too would leave both without a gradient forever.
        # So the module starts as the identity on the prompts.
        self.mix = nn.Parameter(torch.tensor([0.0, 1.0], **dd))

    def forward(self, previous: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.prompts.unsqueeze(0)
        if self.previous_scale is not None:
            x = x + self.previous_scale * previous.unsqueeze(1)
        x = x + self.bottleneck(x)
        x = x + self.mix[0] * self.mixing(x)
        return x + self.mix[1] * self.adapter(x)


class SynQTHead(nn.Module):
    """Logits from ``(B, 1 + 3L, D)`` vectors (``h_0`` first): shared LayerNorm + adapter, weights
    ``[1, tanh(W r_0)]``, mean, LayerNorm, classifier."""

    def __init__(self, dim: int, num_vectors: int, hidden: int, classifier: nn.Module, eps: float = 1e-6, **dd):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, **dd)
        self.adapter = LowRankMLP(dim, hidden, **dd)
        self.gate = nn.Linear(dim, num_vectors - 1, **dd)
        nn.init.zeros_(self.gate.weight)  # tanh(0) = 0: the head starts on h_0 alone
        nn.init.zeros_(self.gate.bias)
        self.final_norm = nn.LayerNorm(dim, eps=eps, **dd)
        self.classifier = classifier

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        r = self.norm(vectors)
        r = r + self.adapter(r)
        weights = torch.cat([r.new_ones(r.shape[0], 1), torch.tanh(self.gate(r[:, 0]))], dim=1)
        pooled = (weights.unsqueeze(-1) * r).mean(dim=1)
        return self.classifier(self.final_norm(pooled))


def _check_block(i: int, block: nn.Module) -> None:
    """SynQT re-runs parts of each block on its queries: it needs timm's pre-norm ``Block`` and ``Attention``."""
    if not isinstance(block, Block):
        raise NotImplementedError(f"blocks[{i}]: SynQT needs timm's Block (pre-norm), got {type(block).__name__}")
    attn = block.attn
    if not isinstance(attn, Attention) or not hasattr(attn, "qkv"):
        raise NotImplementedError(f"blocks[{i}].attn: SynQT needs timm's Attention with a fused qkv, got "
                                  f"{type(attn).__name__}")
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError(f"blocks[{i}].attn.gate: gated attention is not supported by SynQT")


class SynQTModel(FrozenBackboneModel):
    """The frozen ViT plus the query path; features per image: per block its keys and values,
    ``(L, 2, H, N, Dh)``."""

    def __init__(self, vit, num_queries: int, hidden: int, rank: int):
        super().__init__(vit)
        blocks = model_blocks(vit)
        for i, block in enumerate(blocks):
            _check_block(i, block)
        attn = blocks[0].attn
        self.num_heads, self.head_dim = int(attn.num_heads), int(attn.head_dim)
        p = next(vit.parameters())
        dd = {"device": p.device, "dtype": p.dtype}
        self.synthesis = nn.ModuleList(QuerySynthesis(num_queries, self.dim, hidden, rank, i > 0, **dd)
                                       for i in range(len(blocks)))
        self.head = SynQTHead(self.dim, 1 + 3 * len(blocks), hidden, vit.head, **dd)

    def feature_shape(self) -> Tuple[int, ...]:
        return (len(self.synthesis), 2, self.num_heads, self.num_tokens, self.head_dim)

    def backbone_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        x = self.embed_checked(images)
        keys_values = []
        for block in model_blocks(self.backbone):
            captured = []
            hook = block.attn.qkv.register_forward_hook(lambda module, args, out, sink=captured: sink.append(out))
            try:
                y = block(x)
            finally:
                hook.remove()
            if len(captured) == 1:
                qkv = captured[0]
            else:  # the block projected without calling attn.qkv (e.g. an ak.ViTBlock's fused path)
                qkv = block.attn.qkv(block.norm1(x))
            keys_values.append(self._keys_values(block.attn, qkv))
            x = y
        return keys_values

    def _keys_values(self, attn: Attention, qkv: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3·H·Dh)`` projections (timm's layout) -> keys (after ``k_norm``) and values stacked into
        one contiguous ``(B, 2, H, N, Dh)`` buffer, so the queries' projections are not kept alive."""
        B, N, _ = qkv.shape
        _, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return torch.stack((attn.k_norm(k), v), dim=1)

    def _extract(self, block: Block, queries: torch.Tensor, kv: torch.Tensor):
        """Block ``i`` read by its queries with its own frozen weights: ``(A_i, M_i, Z_i)``, each ``(B, T, D)``."""
        attn = block.attn
        B = kv.shape[0]
        queries = queries.expand(B, -1, -1)
        T = queries.shape[1]
        h = block.norm1(queries)
        width = self.num_heads * self.head_dim
        qkv = attn.qkv
        if may_fuse(qkv, nn.Linear):
            # Project the queries only (the first third of qkv's rows). Anything else — a LoRA wrapper, a
            # quantised linear, a module with hooks (alast_kernels.fusion) — is called as a module and its
            # query part taken.
            q = F.linear(h, qkv.weight[:width], None if qkv.bias is None else qkv.bias[:width])
        else:
            q = qkv(h)[..., :width]
        q = attn.q_norm(q.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2))
        o = ops.query_attention(q, kv[:, 0], kv[:, 1], scale=attn.scale)
        a = block.ls1(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, T, width))))
        y = queries + a
        m = block.ls2(block.mlp(block.norm2(y)))
        return a, m, y + m

    def from_features(self, features: Features) -> torch.Tensor:
        layers = features.unbind(1) if isinstance(features, torch.Tensor) else features
        if len(layers) != len(self.synthesis):
            raise ValueError(f"features: expected {len(self.synthesis)} layers, got {len(layers)}")
        vectors = []
        previous = None
        for block, synthesis, kv in zip(model_blocks(self.backbone), self.synthesis, layers):
            a, m, z = self._extract(block, synthesis(previous), kv)
            previous = z.mean(dim=1)
            vectors += [a.mean(dim=1), m.mean(dim=1), previous]
        return self.head(torch.stack([previous] + vectors, dim=1))


@register
class SynQT(FrozenBackboneMethod):
    """Synthesised query tuning over a frozen timm ViT.

    Args:
        model: a timm ``VisionTransformer`` (or a module holding one) with timm's pre-norm ``Block`` and
            ``Attention``, any depth, width and prefix tokens, fixed image size; its classifier
            (``model.head``) is the method's classifier.
        num_queries: ``T``, queries per block (default 4).
        hidden: width of the bottleneck MLPs and adapters (default ``D/16``, 48 on ViT-B).
        rank: rank of the query self-attention's projection residuals (default 8).

    ``method.model(images, ids=None)`` gives logits; ``ids`` feed the optional feature cache
    (:meth:`enable_feature_cache`, per-block keys and values). Trainable: the query synthesis modules and
    the head (its norms, adapter, gate and the ViT's classifier).
    """

    name = "synqt"
    summary = ("frozen backbone without a graph; synthesised queries read each block's keys/values; "
               "query path and head train")

    def __init__(self, model: nn.Module, num_queries: int = 4, hidden: Optional[int] = None, rank: int = 8):
        super().__init__(model)
        dim = int(self.vit.embed_dim)
        hidden = max(1, round(dim / 16)) if hidden is None else hidden
        num_queries, hidden, rank = (check_int(name, value, 1, limit) for name, value, limit in
                                     (("num_queries", num_queries, 128), ("hidden", hidden, dim), ("rank", rank, dim)))
        self.num_queries, self.hidden, self.rank = num_queries, hidden, rank
        self.model = SynQTModel(self.vit, num_queries, hidden, rank)
        set_trainable(self.model, [*self.model.synthesis.parameters(), *self.model.head.parameters()])
