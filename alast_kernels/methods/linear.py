"""``linear``: linear probing — the backbone is frozen and runs without an autograd graph; only the head
(final norm, ``fc_norm`` and classifier) trains."""
from __future__ import annotations

import torch.nn as nn

from ..vit import head_parameters
from .base import Method, register, set_trainable


@register
class LinearProbe(Method):
    name = "linear"
    summary = "frozen backbone, only the final norm and the classifier train"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        set_trainable(self.model, head_parameters(self.vit))
