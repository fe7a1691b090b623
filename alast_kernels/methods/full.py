"""``full``: full fine-tuning, every parameter trains — the baseline every other method is measured against."""
from __future__ import annotations

import torch.nn as nn

from .base import Method, register, set_trainable


@register
class FullFineTuning(Method):
    name = "full"
    summary = "every parameter trains"
    trains_backbone = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        set_trainable(self.model, self.model.parameters())
