"""``evit``: EViT (Liang et al., ICLR 2022) as a fine-tuning baseline — the whole ViT trains, thinned by the
token fuse of Sparse-Tuning without adapters, its keep rate lowered from 1 to ρ by a cosine schedule over
training steps. See docs/methods/evit.md.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, Optional, Sequence

import torch.nn as nn

from .._validate import check_int
from .base import Method, register, set_trainable
from .token_fuse import TokenFuseViT

__all__ = ["EViT"]


@register
class EViT(Method):
    """EViT over a timm ViT: every parameter trains; the token fuse thins the tokens at ``fuse_layers``.

    Args:
        model: a timm ``VisionTransformer`` or a wrapper holding one (DDP, peft, ...). Its blocks are
            converted to :class:`~alast_kernels.ViTBlock` in place; :attr:`model` is a new module around it.
        keep_rate: ρ, the rate the schedule ends at; eval mode always uses it.
        fuse_layers: the fuse blocks (0-based); ``None``: ``round(L/4)·{1, 2, 3}`` (3, 6, 9 of 12).
        schedule_steps: steps over which the training keep rate falls from 1 to ρ (0: ρ from the start).
        warmup_steps: steps at keep rate 1 before the fall begins.

    The keep rate of step ``t`` (counted by :meth:`step` with ``update=True``) is
    ``ρ + (1 − ρ)·(1 + cos(π·u)) / 2`` with ``u = clamp((t − warmup_steps) / schedule_steps, 0, 1)``.
    """

    name = "evit"
    summary = "every parameter trains; token fuse with the keep rate lowered from 1 by a cosine schedule"
    trains_backbone = True

    def __init__(self, model: nn.Module, keep_rate: float = 0.7, fuse_layers: Optional[Sequence[int]] = None,
                 schedule_steps: int = 1000, warmup_steps: int = 0):
        super().__init__(model)
        self.schedule_steps = check_int("schedule_steps", schedule_steps, 0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.model = TokenFuseViT(self.vit, fuse_layers, keep_rate, train_backbone=True)
        set_trainable(self.model, self.model.parameters())
        self.step_count = 0
        self._apply_schedule()

    @classmethod
    def run_options(cls, steps: int) -> Dict:
        """The recipe's schedule scaled to the run: the keep rate falls over the first half of its steps."""
        return {"schedule_steps": max(1, steps // 2)}

    def scheduled_keep_rate(self, step: Optional[int] = None) -> float:
        """The training keep rate of ``step`` (default: the next step)."""
        step = self.step_count if step is None else step
        rho = self.model.keep_rate
        if self.schedule_steps == 0:
            return rho if step >= self.warmup_steps else 1.0
        u = min(max((step - self.warmup_steps) / self.schedule_steps, 0.0), 1.0)
        return rho + (1.0 - rho) * (1.0 + math.cos(math.pi * u)) / 2.0

    def _apply_schedule(self) -> None:
        self.model.training_keep_rate = self.scheduled_keep_rate()

    @contextlib.contextmanager
    def step(self, update: bool = True) -> Iterator[float]:
        """One optimizer step at this step's keep rate (yielded); on a clean exit with ``update`` the
        schedule advances. ``update=False`` leaves it where it was (for measuring a step)."""
        self._apply_schedule()
        yield self.model.training_keep_rate
        if update:
            self.step_count += 1
            self._apply_schedule()

    def _config(self) -> Dict:
        return {"keep_rate": self.model.keep_rate, "fuse_layers": list(self.model.fuse_layers),
                "schedule_steps": self.schedule_steps, "warmup_steps": self.warmup_steps}

    def state_dict(self) -> Dict:
        return {**super().state_dict(), **self._config(), "step": self.step_count}

    def load_state_dict(self, state: Dict) -> None:
        """Resume the schedule; ``ValueError`` naming each setting in which the saved method differs."""
        super().load_state_dict(state)
        mine = self._config()
        differ = [f"{k}={state.get(k, '<missing>')!r} (this method: {v!r})" for k, v in mine.items()
                  if state.get(k, "<missing>") != v]
        if differ:
            raise ValueError(f"state: saved by an evit method with {', '.join(differ)}")
        self.step_count = check_int("state['step']", state.get("step"), 0)
        self._apply_schedule()
