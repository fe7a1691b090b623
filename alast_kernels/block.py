"""``ViTBlock``: timm's ``Block`` with ALaST's per-step plan (token selection, frozen weights, no graph).

With no plan, or in ``eval()`` mode, a ``ViTBlock`` computes what timm's ``Block`` computes, through
:mod:`alast_kernels.ops` so the fused kernels serve full fine-tuning too. With a plan (set by
:class:`alast_kernels.ALaST`) in training mode it follows docs/alast.md §1: in carry mode, score tokens by
the class token's attention, keep the prefix and the top-k others, run the block on those only, write the
update back; in drop mode, run the block on its whole input and pass on the prefix and the top-k others by
the block's own class-token attention (the sequence shrinks through depth).
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from timm.layers import Attention
from timm.models.vision_transformer import Block

from . import ops
from .fusion import LAYER_NORMS, fused_mlp_approximation, may_fuse
from ._validate import check_fraction, check_int
from .backends.reference.attention import cls_probabilities

__all__ = ["BlockPlan", "ViTBlock"]


TOKEN_MODES = ("carry", "drop")
KEEP_RULES = ("ceil", "paper")


@dataclass(frozen=True)
class BlockPlan:
    """What one block does this step.

    keep_ratio: in (0, 1]. With ``tokens="carry"`` the fraction of the block's non-prefix input tokens it
        selects and processes (the others pass through unchanged); with ``tokens="drop"`` the block processes
        its whole input and the fraction of its non-prefix tokens it passes on to the next block (the others
        are dropped for every later block), ranked by the block's own class-token attention.
    train: whether the block's parameters get gradients.
    grad_input: whether anything below the block needs the gradient of its input. A block with neither
        ``train`` nor ``grad_input`` runs without an autograd graph.
    num_patches: the non-prefix input token count ``Np`` the plan is made for, or ``None``. When given, the
        keep count is computed here, once, outside any code ``torch.compile`` traces, and reaches the block
        as the size of a tensor that is marked dynamic, so a compiled block neither sees the float ratio nor
        recompiles for every new count. An input with another ``Np`` (a model with dynamic image size) has
        its count computed from the ratio at forward time.
    tokens: ``"carry"`` or ``"drop"`` (docs/alast.md §1).
    keep_rule: how the ratio becomes a count: ``"ceil"``: ``ceil(keep_ratio · Np)``; ``"paper"`` (the
        authors' rule): ``int(keep_ratio · (P + Np))``, the prefix counted; either clamped to ``[1, Np]``.
    num_prefix: ``P``, the prefix tokens (class token first) the block always keeps; used by ``"paper"``.
    """
    keep_ratio: float = 1.0
    train: bool = True
    grad_input: bool = True
    num_patches: Optional[int] = None
    tokens: str = "carry"
    keep_rule: str = "ceil"
    num_prefix: int = 1
    keep: Optional[int] = field(default=None, init=False)
    _keep_size: Optional[torch.Tensor] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        # Stored as Python numbers: numpy scalars are accepted too.
        object.__setattr__(self, "keep_ratio", check_fraction("keep_ratio", self.keep_ratio))
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"tokens: expected one of {', '.join(TOKEN_MODES)}, got {self.tokens!r}")
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"keep_rule: expected one of {', '.join(KEEP_RULES)}, got {self.keep_rule!r}")
        P = check_int("num_prefix", self.num_prefix, 1)
        object.__setattr__(self, "num_prefix", P)
        n = check_int("num_patches", self.num_patches, 1, optional=True)
        object.__setattr__(self, "num_patches", n)
        if n is not None:
            keep = keep_count(self.keep_ratio, n, self.keep_rule, P)
            size = torch.empty(keep, 0)  # no storage: only its size matters
            torch._dynamo.maybe_mark_dynamic(size, 0)
            object.__setattr__(self, "keep", keep)
            object.__setattr__(self, "_keep_size", size)

    def keep_count(self, num_patches: int) -> int:
        """Non-prefix tokens kept out of ``num_patches`` (a dynamic size under ``torch.compile``)."""
        if self._keep_size is not None and (torch.compiler.is_compiling() or num_patches == self.num_patches):
            # Compiled, the size is trusted without comparing: in drop mode every block sees another
            # `num_patches`, and a guard on it would recompile the shared block code for each of them.
            return self._keep_size.shape[0]
        return keep_count(self.keep_ratio, num_patches, self.keep_rule, self.num_prefix)


def keep_count(ratio: float, num_patches: int, rule: str = "ceil", num_prefix: int = 1) -> int:
    """Non-prefix tokens a plan keeps out of ``num_patches`` (see :class:`BlockPlan`'s ``keep_rule``)."""
    if rule == "paper":
        count = int(ratio * (num_prefix + num_patches))  # truncated, in float64, as the authors' code does
    else:
        # The small slack keeps 0.5 * 196 = 98.00000000000001 from rounding up to 99.
        count = math.ceil(ratio * num_patches - 1e-9)
    return min(num_patches, max(1, count))


# ------------------------------------------------------------------------------ per-block statistics
# What the planned forwards of a step measured, per block: float32 ``(4,)``, added to in place by every
# planned forward (so a compiled block records it without a guard on its value), reset by `ALaST.step()`:
# [Σ mean-over-images Δ, forwards, Σ non-prefix tokens processed, Σ summed-over-images Δ].
def new_stats(device: torch.device) -> torch.Tensor:
    """Statistics of no forward yet: float32 zeros ``(4,)`` on ``device``."""
    return torch.zeros(4, dtype=torch.float32, device=device)


def _record_stats(stats: torch.Tensor, moved: torch.Tensor, processed: int) -> None:
    """Add one planned forward to ``stats``: ``moved`` ``(B,)`` is each image's ‖c_out − c_in‖²."""
    delta = moved.mean()
    stats.add_(torch.stack([delta, torch.ones_like(delta), torch.full_like(delta, processed), moved.sum()]))


class StepStats(NamedTuple):
    """The recorded statistics per forward (each of the shape of ``stats[..., 0]``; NaN where ``forwards``
    is 0)."""
    forwards: torch.Tensor      # planned forwards recorded
    mean_delta: torch.Tensor    # Δ averaged over the images of a forward
    summed_delta: torch.Tensor  # Δ summed over the images of a forward (the authors' measure)
    processed: torch.Tensor     # non-prefix tokens a forward processed


def read_stats(stats: torch.Tensor) -> StepStats:
    """``(..., 4)`` statistics (one block's, or several stacked) -> their per-forward means."""
    forwards = stats[..., 1]
    return StepStats(forwards, stats[..., 0] / forwards, stats[..., 3] / forwards, stats[..., 2] / forwards)


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


def _param(t: Optional[torch.Tensor], train: bool) -> Optional[torch.Tensor]:
    return t if train or t is None else t.detach()


def _run(module: nn.Module, train: bool, *args):
    """``module(*args)``; for a frozen block with its parameters detached, so they get no gradient."""
    if train or next(module.parameters(recurse=True), None) is None:
        return module(*args)
    frozen = {name: t.detach() for name, t in module.named_parameters()}
    return functional_call(module, frozen, args)


def _linear(module: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    if may_fuse(module, nn.Linear):
        return ops.masked_linear(x, module.weight, module.bias, train)
    return _run(module, train, x)


def _layer_norm(norm: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    if may_fuse(norm, LAYER_NORMS):
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

    Its parts — :meth:`attend` (the attention branch), :meth:`feed_forward` (the MLP branch) and
    :meth:`token_scores` — are what other methods (token fuse, adapters) build their blocks from.

    Under ``torch.jit.script`` and ``torch.fx`` symbolic tracing a block is timm's ``Block``: the graph
    computes what timm's does, with timm's modules (no plan, no fused ops); a block with a plan applied
    refuses to be scripted or traced.
    """

    # Statistics read on the host: TorchScript must not compile them (it compiles properties by default),
    # nor type the plan and statistics attributes, which its forward never reads.
    __jit_unused_properties__ = ["alast_importance", "alast_keep"]
    __jit_ignored_attributes__ = ["alast_plan", "alast_stats"]

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
        self.alast_stats: Optional[torch.Tensor] = None  # see `new_stats`

    def _recorded(self) -> Optional[StepStats]:
        stats = None if self.alast_stats is None else read_stats(self.alast_stats)
        return None if stats is None or stats.forwards.item() == 0 else stats

    @property
    def alast_importance(self) -> Optional[torch.Tensor]:
        """Mean Δ (class-token movement) over the planned forwards recorded in :attr:`alast_stats`."""
        stats = self._recorded()
        return None if stats is None else stats.mean_delta

    @property
    def alast_keep(self) -> Optional[int]:
        """Non-prefix tokens the recorded planned forwards processed (their mean, rounded)."""
        stats = self._recorded()
        return None if stats is None else round(stats.processed.item())

    # ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if torch.jit.is_scripting():
            # A static condition to TorchScript: it compiles this branch and nothing after it (the plan,
            # the op dispatch and the Python checks below are not scriptable).
            return self._timm_forward(x, attn_mask, is_causal)
        if isinstance(x, torch.fx.Proxy):
            # Symbolic tracing cannot follow the shape checks and the op dispatch below: trace timm's Block.
            self._check_no_plan("torch.fx symbolic tracing")
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
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
        # Compiled, a planned block always selects: one graph for every keep count, `keep == Np` included.
        select = torch.compiler.is_compiling()
        with torch.no_grad() if no_graph else contextlib.nullcontext():
            if not plan.grad_input:
                x = x.detach()
            if plan.tokens == "drop":
                out, delta_cls = self._forward_then_drop(x, keep, num_patches, plan.train, select)
                processed = num_patches
            else:
                out, delta_cls = self._forward_tokens(x, keep, num_patches, train=plan.train, select=select)
                processed = keep
        with torch.no_grad():
            if self.alast_stats is None:
                self.alast_stats = new_stats(x.device)
            _record_stats(self.alast_stats, delta_cls.float().pow(2).sum(-1), processed)
        return out

    def _timm_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        """timm's ``Block.forward``, written out for TorchScript (which cannot call ``super().forward``).
        ``tests/test_timm_model_tests.py`` checks that a scripted converted model gives timm's output."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _check_no_plan(self, what: str) -> None:
        """``RuntimeError`` when a plan is applied: a scripted or traced graph is timm's Block and would
        silently drop it."""
        if self.training and self.alast_plan is not None:
            raise RuntimeError(f"{what}: this ViTBlock has an ALaST plan applied (inside ALaST.step()), which a "
                               f"scripted or traced graph cannot carry; script or trace outside a step, or call "
                               f"ak.restore(model) first to get timm's Blocks back")

    def __prepare_scriptable__(self) -> "ViTBlock":
        # torch.jit.script calls this on every submodule before compiling: the block itself is scriptable
        # (see forward), unless a plan is applied.
        self._check_no_plan("torch.jit.script")
        return self

    def _forward_then_drop(self, x: torch.Tensor, keep: int, num_patches: int, train: bool, select: bool):
        """Drop mode: the block on all of ``x``, then the prefix and the ``keep`` non-prefix tokens its own
        class-token attention row ranks highest, in index order; returns (``(B, P + keep, D)``, class-token
        update). ``keep == num_patches`` passes every token on without selecting, unless ``select``."""
        a, scores = self.attend(x, train, return_cls=True)
        y = x + a
        m = self.feed_forward(y, train)
        out = y + m
        if select or keep < num_patches:
            idx = ops.select_tokens(scores, keep, self.num_prefix_tokens)
            out = ops.gather_tokens(out, idx, check_indices=False)
        return out, a[:, 0] + m[:, 0]

    def _forward_tokens(self, x: torch.Tensor, keep: int, num_patches: int, train: bool, select: bool = False):
        """The block on the prefix and ``keep`` selected tokens; returns (output, class-token update).

        ``keep == num_patches`` runs every token without selecting, unless ``select``."""
        if select or keep < num_patches:
            idx = ops.select_tokens(self.token_scores(x), keep, self.num_prefix_tokens)
            norm1 = self.norm1
            if may_fuse(norm1, LAYER_NORMS):
                x_kept, h = ops.gather_layer_norm(x, idx, _param(norm1.weight, train), _param(norm1.bias, train),
                                                  norm1.eps, check_indices=False)
            else:
                x_kept = ops.gather_tokens(x, idx, check_indices=False)
                h = _run(norm1, train, x_kept)
            a, _ = self.attend(x_kept, train, normed=h)
            m = self.feed_forward(x_kept + a, train)
            delta = a + m
            return ops.scatter_tokens(x, idx, delta, check_indices=False), delta[:, 0]
        a, _ = self.attend(x, train)
        y = x + a
        m = self.feed_forward(y, train)
        return y + m, a[:, 0] + m[:, 0]

    # ------------------------------------------------------------------------------------- parts
    def attend(self, x: torch.Tensor, train: bool = True, *, normed: Optional[torch.Tensor] = None,
               return_cls: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The attention branch ``drop_path1(ls1(attn(norm1(x))))`` — without the residual.

        x: ``(B, N, D)``; ``normed``: ``norm1(x)`` when the caller already has it. ``train=False`` gives the
        block's parameters no gradient and keeps only what the input gradient needs. Returns the branch in
        ``x``'s dtype (under autocast the branch is cast once, as timm's ``x + a`` promotes it, so its
        gradient is summed in ``x``'s dtype) and, with ``return_cls``, the float32 ``(B, N)`` head mean of
        the class token's attention probabilities over all tokens (no gradient), else ``None``.
        """
        h = _layer_norm(self.norm1, x, train) if normed is None else normed
        attn = self.attn
        B, K, _ = h.shape
        qkv = _linear(attn.qkv, h, train)
        q, k, v = qkv.view(B, K, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = _run(attn.q_norm, train, q), _run(attn.k_norm, train, k)
        cls = None
        if self.training and attn.attn_drop.p > 0:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p, scale=attn.scale)
            if return_cls:
                cls = cls_probabilities(q, k, attn.scale)
        elif return_cls:
            o, cls = ops.attention(q, k, v, scale=attn.scale, return_cls=True)
        else:
            o = ops.attention(q, k, v, scale=attn.scale)
        o = _run(attn.norm, train, o.transpose(1, 2).reshape(B, K, attn.attn_dim))
        o = attn.proj_drop(_linear(attn.proj, o, train))
        return self.drop_path1(_run(self.ls1, train, o)).to(x.dtype), cls

    def feed_forward(self, y: torch.Tensor, train: bool = True) -> torch.Tensor:
        """The MLP branch ``drop_path2(ls2(mlp(norm2(y))))`` in ``y``'s dtype — without the residual.

        y: ``(B, N, D)``. A plain timm ``Mlp`` with a known GELU runs as one fused op; any other MLP is
        called as a module.
        """
        h = _layer_norm(self.norm2, y, train)
        mlp = self.mlp
        approximate = fused_mlp_approximation(mlp, self.training)
        if approximate is None:
            m = _run(mlp, train, h)
        else:
            m = ops.masked_mlp(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, train, approximate)
        return self.drop_path2(_run(self.ls2, train, m)).to(y.dtype)

    def token_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 ``(B, N)`` class-token attention scores of ``x`` under this block's own projections.

        With a plain ``nn.LayerNorm`` ``norm1`` and a plain ``nn.Linear`` ``qkv`` the scores come from one
        ``D``-vector per image and head (the keys are never projected); otherwise (a LoRA or other wrapped
        ``qkv``, another norm) ``norm1`` and ``qkv`` are called as modules and every key is projected, so the
        scores are those of the block as it computes.
        """
        attn = self.attn
        q_norm = None if isinstance(attn.q_norm, nn.Identity) else attn.q_norm
        k_norm = None if isinstance(attn.k_norm, nn.Identity) else attn.k_norm
        if may_fuse(self.norm1, LAYER_NORMS) and may_fuse(attn.qkv, nn.Linear):
            return ops.cls_scores(x, self.norm1.weight, self.norm1.bias, attn.qkv.weight, attn.qkv.bias,
                                  attn.num_heads, eps=self.norm1.eps, scale=attn.scale, q_norm=q_norm,
                                  k_norm=k_norm)
        with torch.no_grad():
            B, N, _ = x.shape
            qkv = attn.qkv(self.norm1(x)).view(B, N, 3, attn.num_heads, attn.head_dim)
            q, k = attn.q_norm(qkv[:, :1, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
            return cls_probabilities(q, k, attn.scale)
