"""``alast`` and ``alast+lora``: the ALaST controller (:class:`alast_kernels.ALaST`) as a method, alone or over
peft LoRA adapters (the combination the ALaST paper reports)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch.nn as nn

from ..controller import UNSET, ALaST
from .base import Method, register, set_trainable
from .lora import DEFAULT_TARGETS, add_lora


@register
class ALaSTMethod(Method):
    name = "alast"
    summary = "adaptive per-layer token budgets and layer freezing, all weights trainable"
    trains_backbone = True

    def __init__(self, model: nn.Module, token_budget=UNSET, train_layers: Optional[int] = None,
                 policy: str = "alast", alpha=UNSET, min_keep=UNSET, sample: bool = False,
                 seed: int = 0, train_embeddings: Optional[bool] = None,
                 keep_ratios: Optional[Sequence[float]] = None, train: Optional[Sequence[bool]] = None,
                 tokens: Optional[str] = None, flop_budget=None):
        super().__init__(model)
        # The controller reads which embeddings require grad, so the flags are set first; a refused option
        # puts every flag back, so a failed create leaves the user's model as it was.
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        if self.name == "alast":
            set_trainable(self.model, self.model.parameters())
        try:
            self.controller = ALaST(self.model, token_budget=token_budget, train_layers=train_layers,
                                    policy=policy, alpha=alpha, min_keep=min_keep, sample=sample, seed=seed,
                                    train_embeddings=train_embeddings, keep_ratios=keep_ratios, train=train,
                                    tokens=tokens, flop_budget=flop_budget)
        except BaseException:
            for p, requires_grad in flags:
                p.requires_grad_(requires_grad)
            raise

    def step(self, update: bool = True):
        return self.controller.step(update=update)

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "controller": self.controller.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])


@register
class ALaSTLoRA(ALaSTMethod):
    name = "alast+lora"
    summary = "ALaST over peft LoRA adapters: the adapters of the trained blocks and the head train"
    trains_backbone = False

    def __init__(self, model: nn.Module, rank: int = 8, lora_alpha: float = 8.0, dropout: float = 0.0,
                 target_modules: Sequence[str] = DEFAULT_TARGETS, **alast_options):
        super().__init__(add_lora(model, rank, lora_alpha, dropout, target_modules), **alast_options)
