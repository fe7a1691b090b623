"""``lora``: LoRA adapters from Hugging Face peft on the attention and MLP projections; the backbone is
frozen, the adapters and the classifier head train."""
from __future__ import annotations

import re
from typing import Sequence

import torch.nn as nn

from .._validate import check_int, check_real
from .base import Method, register

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]) -> nn.Module:
    """``model`` with peft LoRA adapters on the blocks' layers named ``target_modules`` (any of ``qkv``,
    ``proj``, ``fc1``, ``fc2``), as a ``PeftModel``; the classifier ``head`` trains too (peft's
    ``modules_to_save``). Only adapters and head train."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    rank = check_int("rank", rank, 1)
    alpha = check_real("alpha", alpha)
    dropout = check_real("dropout", dropout, 0, 1, high_open=True)
    if isinstance(model, PeftModel) or any(isinstance(m, DistributedDataParallel) for m in model.modules()):
        raise ValueError(f"model: expected a model without peft adapters or a DDP wrapper, got "
                         f"{type(model).__name__}; add LoRA first, then wrap the method's model in DDP")
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules: expected a non-empty sequence of module names, got {target_modules!r}")
    # Only the blocks' layers: a bare "proj" would also match the patch embedding's convolution.
    pattern = rf".*blocks\.\d+\.(attn|mlp)\.({'|'.join(re.escape(t) for t in target_modules)})"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern,
                        modules_to_save=["head"])
    return get_peft_model(model, config)


@register
class LoRA(Method):
    """peft LoRA over the blocks' linear layers.

    Args:
        rank: the adapters' rank ``r``; alpha: peft's ``lora_alpha`` (the update is scaled by ``alpha / r``;
            8 and 8 are peft's own defaults); dropout: on the adapters' input; target_modules: which of the
            blocks' ``qkv``, ``proj``, ``fc1``, ``fc2`` get adapters.
    """

    name = "lora"
    summary = "peft LoRA on qkv/proj/fc1/fc2, adapters and head train"

    def __init__(self, model: nn.Module, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 target_modules: Sequence[str] = DEFAULT_TARGETS):
        super().__init__(add_lora(model, rank, alpha, dropout, target_modules))
