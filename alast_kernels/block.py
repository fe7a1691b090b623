"""``ViTBlock``: timm's ``Block`` with ALaST's per-step plan (token selection, frozen weights, no graph).

With no plan, or in ``eval()`` mode, a ``ViTBlock`` computes what timm's ``Block`` computes, through
:mod:`alast_kernels.ops` so the fused kernels serve full fine-tuning too. With a plan (set by
:class:`alast_kernels.ALaST`) in training mode it follows DESIGN.md §1: score tokens by the class token's
attention, keep the prefix and the top-k others, run the block on those only, write the update back.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from timm.layers import Attention, Mlp
from timm.layers.activations import GELU as TimmGELU, GELUTanh as TimmGELUTanh
from timm.models.vision_transformer import Block

from . import ops

__all__ = ["BlockPlan", "ViTBlock"]


@dataclass(frozen=True)
class BlockPlan:
    """What one block does this step.

    keep_ratio: fraction of the non-prefix tokens the block processes, in (0, 1]; the count is
        ``ceil(keep_ratio · Np)`` clamped to ``[1, Np]``, taken at forward time from the input's ``Np``.
    train: whether the block's parameters get gradients.
    grad_input: whether anything below the block needs the gradient of its input. A block with neither
        ``train`` nor ``grad_input`` runs without an autograd graph.
    """
    keep_ratio: float = 1.0
    train: bool = True
    grad_input: bool = True

    def __post_init__(self):
        r = self.keep_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 1:
            raise ValueError(f"keep_ratio: expected a number in (0, 1], got {r!r}")

    def keep_count(self, num_patches: int) -> int:
        # The small slack keeps 0.5 * 196 = 98.00000000000001 from rounding up to 99.
        return min(num_patches, max(1, math.ceil(self.keep_ratio * num_patches - 1e-9)))


# Block keywords a ViTBlock honours; any other keyword Block has must keep its default value.
_HONOURED = {
    "dim", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias",
    "proj_drop", "attn_drop", "init_values", "drop_path", "act_layer", "norm_layer", "mlp_layer",
    "attn_layer", "depth", "device", "dtype",
}
_BLOCK_PARAMS = {name: p for name, p in inspect.signature(Block.__init__).parameters.items() if name != "self"}


def _is_off(value) -> bool:
    return value is None or value is False or (isinstance(value, (int, float)) and value == 0)


def check_supported(block: nn.Module) -> None:
    """Raise ``NotImplementedError`` naming the option when ``block`` has a layout ViTBlock cannot run."""
    attn = getattr(block, "attn", None)
    if type(attn) is not Attention:
        raise NotImplementedError(f"attn_layer={type(attn).__name__}: ViTBlock supports timm's Attention only")
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention (Attention.gate): not supported by ViTBlock")
    if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
        raise NotImplementedError("attn.qkv/attn.proj: ViTBlock needs nn.Linear projections")


def _gelu_approximation(act: nn.Module) -> Optional[str]:
    if type(act) is nn.GELU:
        return act.approximate
    if type(act) is TimmGELU:
        return "none"
    if type(act) is TimmGELUTanh:
        return "tanh"
    return None


def _param(t: Optional[torch.Tensor], train: bool) -> Optional[torch.Tensor]:
    return t if train or t is None else t.detach()


def _run(module: nn.Module, train: bool, *args):
    """``module(*args)``; for a frozen block with its parameters detached, so they get no gradient."""
    if train or next(module.parameters(recurse=True), None) is None:
        return module(*args)
    frozen = {name: t.detach() for name, t in module.named_parameters()}
    return functional_call(module, frozen, args)


def _layer_norm(norm: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, _param(norm.weight, train), _param(norm.bias, train),
                            norm.eps)
    return _run(norm, train, x)


class ViTBlock(Block):
    """Drop-in for ``timm.models.vision_transformer.Block`` that ALaST can plan.

    Same constructor keywords, parameter names, ``state_dict`` keys and
    ``forward(x, attn_mask=None, is_causal=False)`` as timm's ``Block``. A keyword ViTBlock does not know is
    accepted while it is off (``None``, ``False`` or 0); an option it cannot honour raises
    ``NotImplementedError`` naming it.

    x: ``(B, N, D)`` with ``num_prefix_tokens`` prefix tokens first (set by :func:`alast_kernels.convert`
    from the model; 1 by default).
    """

    def __init__(self, dim: int, num_heads: int, *args, **kwargs):
        known = {k: v for k, v in kwargs.items() if k in _BLOCK_PARAMS}
        for name, value in kwargs.items():
            if name not in _BLOCK_PARAMS and not _is_off(value):
                raise NotImplementedError(f"{name}={value!r}: option not supported by ViTBlock")
        bound = inspect.signature(Block.__init__).bind(None, dim, num_heads, *args, **known)
        for name, value in bound.arguments.items():
            if name in _BLOCK_PARAMS and name not in _HONOURED and value != _BLOCK_PARAMS[name].default:
                raise NotImplementedError(f"{name}={value!r}: option not supported by ViTBlock")
        super().__init__(dim, num_heads, *args, **known)
        check_supported(self)
        self.init_alast()

    def init_alast(self, num_prefix_tokens: int = 1) -> None:
        """Set the ALaST state on a block (called by the constructor and by ``convert``)."""
        self.num_prefix_tokens = num_prefix_tokens
        self.alast_plan: Optional[BlockPlan] = None
        self.alast_importance: Optional[torch.Tensor] = None  # Δ of the last planned forward, float32
        self.alast_keep: Optional[int] = None  # tokens kept by the last planned forward

    # ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        plan = self.alast_plan if self.training else None
        if attn_mask is not None or is_causal:
            if plan is not None:
                raise NotImplementedError("attn_mask/is_causal: not supported while an ALaST plan is applied")
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if x.dim() != 3:
            raise ValueError(f"x: expected a (B, N, D) tensor, got shape {tuple(x.shape)}")
        P = self.num_prefix_tokens
        num_patches = x.shape[1] - P
        if num_patches < 1:
            raise ValueError(f"x: expected more than num_prefix_tokens={P} tokens, got {x.shape[1]}")
        if plan is None:
            out, _ = self._forward_tokens(x, num_patches, num_patches, train=True)
            return out

        keep = plan.keep_count(num_patches)
        no_graph = not plan.train and not plan.grad_input
        with torch.no_grad() if no_graph else contextlib.nullcontext():
            if not plan.grad_input:
                x = x.detach()
            out, delta_cls = self._forward_tokens(x, keep, num_patches, train=plan.train)
        self.alast_importance = delta_cls.detach().float().pow(2).sum(-1).mean()
        self.alast_keep = keep
        return out

    def _forward_tokens(self, x: torch.Tensor, keep: int, num_patches: int, train: bool):
        """The block on the prefix and ``keep`` selected tokens; returns (output, class-token update)."""
        norm1 = self.norm1
        selecting = keep < num_patches
        if selecting:
            if not isinstance(norm1, nn.LayerNorm):
                raise NotImplementedError(f"norm_layer={type(norm1).__name__}: token selection needs a LayerNorm")
            idx = ops.select_tokens(self.token_scores(x), keep, self.num_prefix_tokens)
            x_kept, h = ops.gather_layer_norm(x, idx, _param(norm1.weight, train), _param(norm1.bias, train),
                                              norm1.eps, check_indices=False)
        else:
            x_kept, h = x, _layer_norm(norm1, x, train)

        # Under autocast the branches come back in the autocast dtype while the residual stream keeps x's:
        # cast each branch once, as timm's `x + a` promotes it, so its gradient is summed in x's dtype.
        a = self.drop_path1(_run(self.ls1, train, self._attention(h, train))).to(x.dtype)
        y = x_kept + a
        m = self.drop_path2(_run(self.ls2, train, self._mlp(_layer_norm(self.norm2, y, train), train))).to(x.dtype)
        if selecting:
            delta = a + m
            return ops.scatter_tokens(x, idx, delta, check_indices=False), delta[:, 0]
        return y + m, a[:, 0] + m[:, 0]

    def token_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 ``(B, N)`` class-token attention scores of ``x`` under this block's own projections."""
        attn = self.attn
        q_norm = None if isinstance(attn.q_norm, nn.Identity) else attn.q_norm
        k_norm = None if isinstance(attn.k_norm, nn.Identity) else attn.k_norm
        return ops.cls_scores(x, self.norm1.weight, self.norm1.bias, attn.qkv.weight, attn.qkv.bias,
                              attn.num_heads, eps=self.norm1.eps, scale=attn.scale, q_norm=q_norm,
                              k_norm=k_norm)

    def _attention(self, h: torch.Tensor, train: bool) -> torch.Tensor:
        attn = self.attn
        B, K, _ = h.shape
        qkv = ops.masked_linear(h, attn.qkv.weight, attn.qkv.bias, train)
        q, k, v = qkv.view(B, K, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = _run(attn.q_norm, train, q), _run(attn.k_norm, train, k)
        if self.training and attn.attn_drop.p > 0:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p, scale=attn.scale)
        else:
            o = ops.attention(q, k, v, scale=attn.scale)
        o = _run(attn.norm, train, o.transpose(1, 2).reshape(B, K, attn.attn_dim))
        return attn.proj_drop(ops.masked_linear(o, attn.proj.weight, attn.proj.bias, train))

    def _mlp(self, h: torch.Tensor, train: bool) -> torch.Tensor:
        mlp = self.mlp
        fused = (type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
                 and isinstance(mlp.norm, nn.Identity) and _gelu_approximation(mlp.act) is not None
                 and not (self.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0)))
        if not fused:
            return _run(mlp, train, h)
        return ops.masked_mlp(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, train,
                              _gelu_approximation(mlp.act))
