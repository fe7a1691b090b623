"""``alast`` and ``alast+lora``: the ALaST controller (:class:`alast_kernels.ALaST`) as a method, alone or over
peft LoRA adapters (the combination the ALaST paper reports)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch.nn as nn

from ..controller import ALaST
from .base import Method, register, set_trainable
from .lora import DEFAULT_TARGETS, add_lora


@register
class ALaSTMethod(Method):
    name = "alast"
    summary = "adaptive per-layer token budgets and layer freezing, all weights trainable"
    trains_backbone = True

    # Its options are the controller's own keywords and defaults (``options_of`` reads them from there).
    option_source = ALaST.__init__

    def __init__(self, model: nn.Module, **options):
        super().__init__(model)
        # The controller reads which embeddings require grad, so the flags are set first; a refused option
        # leaves the user's model as it was through create()'s restore (methods/base.py).
        if self.name == "alast":
            set_trainable(self.model, self.model.parameters())
        self.controller = ALaST(self.model, **options)

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
