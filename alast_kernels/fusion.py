"""Whether a fused op may stand in for a module's call: one rule for the blocks and every method.

A fused op replaces a module only when the module is exactly the type the op implements — ``nn.Linear``,
``nn.LayerNorm`` (or timm's ``LayerNorm``), timm's ``Mlp`` with a GELU — and nothing observes its call: no
forward, forward-pre, backward or backward-pre hook on the module, and no global module hook
(``nn.modules.module.register_module_*_hook``). Anything else — a peft/loralib LoRA layer, a subclass, a
quantised linear, a module with hooks — is called as a module, so whatever it adds is computed and trained.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type, Union

import torch.nn as nn
from timm.layers import LayerNorm as TimmLayerNorm, Mlp
from timm.layers.activations import GELU as TimmGELU, GELUTanh as TimmGELUTanh

__all__ = ["LAYER_NORMS", "hooked", "may_fuse", "gelu_approximation", "fused_mlp_approximation"]

# timm's own LayerNorm (its ViTs' default) computes F.layer_norm like nn.LayerNorm: both are exact types.
LAYER_NORMS: Tuple[type, ...] = (nn.LayerNorm, TimmLayerNorm)

_module_hooks = nn.modules.module


def hooked(module: nn.Module) -> bool:
    """Whether a hook would observe a call of ``module``: one of its own, of any kind, or a global one."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_hooks._global_forward_hooks
                or _module_hooks._global_forward_pre_hooks or _module_hooks._global_backward_hooks
                or _module_hooks._global_backward_pre_hooks)


def may_fuse(module: nn.Module, types: Union[Type[nn.Module], Tuple[Type[nn.Module], ...]]) -> bool:
    """``module`` is exactly one of ``types`` (no subclass) and no hook observes its call: a fused op may
    replace the call."""
    return type(module) in (types if isinstance(types, tuple) else (types,)) and not hooked(module)


def gelu_approximation(act: nn.Module) -> Optional[str]:
    """GELU's ``approximate`` (``"none"``, ``"tanh"``) when ``act`` is a GELU a fused op may replace, else
    ``None``."""
    if hooked(act):
        return None
    if type(act) is nn.GELU:
        return act.approximate
    if type(act) is TimmGELU:
        return "none"
    if type(act) is TimmGELUTanh:
        return "tanh"
    return None


def fused_mlp_approximation(mlp: nn.Module, training: bool) -> Optional[str]:
    """GELU's ``approximate`` when ``mlp`` is a plain timm ``Mlp`` that ``ops.masked_mlp`` computes exactly
    (in ``training`` mode too: no dropout), else ``None`` (the module is called)."""
    if not (may_fuse(mlp, Mlp) and may_fuse(mlp.fc1, nn.Linear) and may_fuse(mlp.fc2, nn.Linear)
            and may_fuse(mlp.norm, nn.Identity)):
        return None
    if training and (mlp.drop1.p > 0 or mlp.drop2.p > 0):
        return None
    return gelu_approximation(mlp.act)
