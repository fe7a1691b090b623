"""The ALaST controller: per-step plans for every block from the blocks' recent importance.

::

    alast = ALaST(model, token_budget=0.6, train_layers=9)
    for x, y in loader:
        with alast.step():          # plans applied on entry, budgets updated on exit
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from . import distributed, policies
from .block import BlockPlan, ViTBlock
from .convert import convert
from .vit import embedding_parameters, find_vit, model_blocks

__all__ = ["ALaST", "StepPlan"]

POLICIES = ("alast", "paper", "fixed")
# What a saved state must agree on with the controller that loads it.
_CONFIG = ("policy", "num_layers", "token_budget", "train_layers", "alpha", "min_keep", "sample",
           "train_embeddings")


@dataclass(frozen=True)
class StepPlan:
    """The plans of one step, one entry per block."""
    step: int
    keep_ratios: List[float]
    train: List[bool]
    grad_input: List[bool]
    budgets: List[float]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (0 < value <= 1):
        raise ValueError(f"{name}: expected a number in (0, 1], got {value!r}")
    return float(value)


class ALaST:
    """Adaptive Layer Selection for a timm ``VisionTransformer`` (docs/alast.md §2).

    Args:
        model: a timm ``VisionTransformer`` with a class token, or a module holding one — a
            ``DistributedDataParallel`` (with ``find_unused_parameters=True``), a peft model, a
            ``torch.compile`` wrapper. Its blocks are converted to :class:`ViTBlock` in place if they are
            not already.
        token_budget: mean keep ratio over the blocks, in (0, 1] (``"alast"`` policy).
        train_layers: how many blocks train each step, in [1, L]; default ``ceil(0.75·L)``.
        policy: ``"alast"`` (default), ``"paper"`` or ``"fixed"``.
        alpha: budget update rate, in (0, 1].
        min_keep: the lowest keep ratio a block gets, in (0, 1]; at most ``token_budget``.
        sample: draw the trained blocks with probability ∝ budget instead of taking the highest
            (``"paper"`` always samples).
        seed: seed of the sampling generator.
        train_embeddings: whether the patch/position embeddings and prefix tokens train. ``None`` (the
            default): they do when any of them requires grad at construction, as in full fine-tuning, and
            do not when they are frozen (as peft LoRA leaves them). When they do not, they and every block
            below the lowest trained one run with no autograd graph. The final norm and the head always
            train.
        keep_ratios, train: the per-block keep ratios and trained flags of the ``"fixed"`` policy.
        process_group: the ranks that must agree on every plan when ``torch.distributed`` is initialised
            (default: the world). Their block importances are averaged before each budget update and
            rank 0's ``seed`` seeds the sampling everywhere.
    """

    def __init__(self, model: nn.Module, token_budget: float = 0.6, train_layers: Optional[int] = None,
                 policy: str = "alast", alpha: float = 0.1, min_keep: float = 0.2, sample: bool = False,
                 seed: int = 0, train_embeddings: Optional[bool] = None, keep_ratios: Optional[Sequence[float]] = None,
                 train: Optional[Sequence[bool]] = None, process_group=None):
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
        vit = find_vit(model)
        distributed.check_wrapper(model, "ALaST")
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("model: ALaST scores tokens by the class token's attention, and this model has no "
                             "class token (cls_token is None)")
        L = len(model_blocks(vit))
        self.policy = policy
        self.token_budget = _check_fraction("token_budget", token_budget)
        self.alpha = _check_fraction("alpha", alpha)
        self.min_keep = _check_fraction("min_keep", min_keep)
        if policy == "alast" and self.min_keep > self.token_budget:
            raise ValueError(f"min_keep: expected at most token_budget={token_budget}, got {min_keep}")
        if train_layers is None:
            train_layers = math.ceil(0.75 * L)
        if isinstance(train_layers, bool) or not isinstance(train_layers, int) or not 1 <= train_layers <= L:
            raise ValueError(f"train_layers: expected an int in [1, {L}] (the model has {L} blocks), "
                             f"got {train_layers!r}")
        self.train_layers = train_layers
        self.sample = bool(sample) or policy == "paper"
        self.seed = int(seed)
        if train_embeddings is None:
            # As the model stands: embeddings left trainable train, as in full fine-tuning; frozen ones (peft
            # LoRA freezes them) stay frozen and cost no autograd graph.
            train_embeddings = any(p.requires_grad for p in embedding_parameters(vit))
        elif not isinstance(train_embeddings, bool):
            raise ValueError(f"train_embeddings: expected True, False or None, got {train_embeddings!r}")
        elif train_embeddings and not any(p.requires_grad for p in embedding_parameters(vit)):
            # Every block would pass gradients down to embeddings that never take one.
            raise ValueError("train_embeddings=True: no embedding parameter requires grad (frozen, e.g. by peft); "
                             "unfreeze them or pass None or False")
        self.train_embeddings = train_embeddings
        if policy == "fixed":
            if keep_ratios is None or train is None:
                raise ValueError("keep_ratios, train: the 'fixed' policy needs both, one entry per block")
            if len(keep_ratios) != L:
                raise ValueError(f"keep_ratios: expected {L} entries (one per block), got {len(keep_ratios)}")
            if len(train) != L:
                raise ValueError(f"train: expected {L} entries (one per block), got {len(train)}")
            self.keep_ratios = [_check_fraction(f"keep_ratios[{i}]", r) for i, r in enumerate(keep_ratios)]
            self.train_flags = [bool(t) for t in train]
        elif keep_ratios is not None or train is not None:
            raise ValueError(f"keep_ratios, train: only the 'fixed' policy takes them (policy={policy!r})")
        # Converted only once every argument is known good: a rejected controller leaves the model alone.
        convert(vit)
        self.model = vit  # the timm VisionTransformer planned
        self.blocks: List[ViTBlock] = list(vit.blocks)
        # Keep counts are made for the model's patch count; with dynamic image sizes, at forward time.
        self.num_patches: Optional[int] = None if getattr(vit, "dynamic_img_size", False) \
            else int(vit.patch_embed.num_patches)
        self.process_group = distributed.active_group(process_group)
        if self.process_group is not None:
            self.seed = distributed.agree_on_seed(self.seed, self.process_group)

        self.budgets: List[float] = [1.0] * L
        self.previous_deltas: Optional[List[float]] = None
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history: List[Dict] = []
        self.overhead_seconds = 0.0  # time spent in the controller's own bookkeeping
        self._pending: Optional[StepPlan] = None
        self._generator_state: Optional[torch.Tensor] = None  # generator state the pending plan was drawn from

    # ---------------------------------------------------------------------------------------- plans
    def plan(self) -> StepPlan:
        """The plan of the next step (drawn once; ``step()`` applies it)."""
        if self._pending is None:
            # The state the plan was drawn from: a resumed run must draw the same plan again.
            self._generator_state = self.generator.get_state()
            self._pending = self._make_plan()
        return self._pending

    def _make_plan(self) -> StepPlan:
        b = self.budgets
        if self.policy == "fixed":
            ratios, train = list(self.keep_ratios), list(self.train_flags)
        else:
            if self.policy == "alast":
                ratios = policies.water_fill(b, self.token_budget, self.min_keep)
            else:
                ratios = [max(v, self.min_keep) for v in b]
            if self.sample:
                train = policies.sample_layers(b, self.train_layers, self.generator)
            else:
                train = policies.top_layers(b, self.train_layers)
        grad_input = [self.train_embeddings or any(train[:l]) for l in range(len(train))]
        return StepPlan(self.step_count, ratios, train, grad_input, list(b))

    def _frozen_embeddings(self):
        return [] if self.train_embeddings else list(embedding_parameters(self.model))

    def _frozen_parameters(self, plan: StepPlan) -> List[nn.Parameter]:
        frozen = [p for blk, train in zip(self.blocks, plan.train) if not train for p in blk.parameters()]
        return frozen + self._frozen_embeddings()

    def _clear_gradients(self, frozen: List[nn.Parameter]) -> None:
        """``.grad = None`` on the parameters this step freezes; an error if that would drop a gradient.

        A zero gradient (``zero_grad(set_to_none=False)``) is cleared, since the optimizer would still apply
        momentum and weight decay with it. A non-zero one is what earlier backward passes left for the next
        optimizer step (accumulation over several ``step()`` contexts): dropping it silently would lose
        those micro-batches.
        """
        grads = [(p, p.grad) for p in frozen if p.grad is not None]
        if grads:
            with torch.no_grad():
                nonzero = torch.stack([g.ne(0).any() for _, g in grads]).tolist()
            kept = {id(p) for (p, _), bad in zip(grads, nonzero) if bad}
            if kept:
                where = sorted({f"blocks.{i}" for i, blk in enumerate(self.blocks)
                                for p in blk.parameters() if id(p) in kept}
                               | {"embeddings" for p in self._frozen_embeddings() if id(p) in kept})
                raise RuntimeError(
                    f"ALaST.step(): {', '.join(where)} hold gradients from earlier backward passes, and this "
                    f"step freezes them, which would discard those gradients. Accumulate micro-batches inside "
                    f"one `with alast.step():` (one plan for all of them), or call optimizer.step() and "
                    f"zero_grad() before the next step")
            for p, _ in grads:
                p.grad = None

    # ----------------------------------------------------------------------------------------- step
    @contextlib.contextmanager
    def step(self, update: bool = True):
        """Apply this step's plans to the blocks; on a clean exit update the budgets from the blocks' Δ.

        Several forward/backward passes (micro-batches accumulated into one optimizer step) may run inside
        one step: they share its plan, and the budgets are updated from their mean Δ.

        With ``update=False`` the plan is applied but nothing is recorded or updated and the step does not
        count: the next ``step()`` makes the same plan (for measuring a step without changing training).

        Parameters that do not train this step have their ``.grad`` set to ``None`` on entry, so the
        optimizer leaves them alone (``RuntimeError`` if one holds a non-zero gradient: see
        :meth:`_clear_gradients`). Frozen embeddings have ``requires_grad`` off inside the step, so they
        build no autograd graph; it is restored on exit. Yields the :class:`StepPlan`.
        """
        if not self.model.training:
            raise RuntimeError("ALaST.step(): the model is in eval mode; call model.train() first")
        start = time.perf_counter()
        plan = self.plan()
        self._clear_gradients(self._frozen_parameters(plan))
        for blk, ratio, train, grad_input in zip(self.blocks, plan.keep_ratios, plan.train, plan.grad_input):
            blk.alast_plan = BlockPlan(ratio, train, grad_input, self.num_patches)
            blk.alast_stats = torch.zeros(3, dtype=torch.float32, device=_device(blk))
        # Nothing below the embeddings needs their gradient: without requires_grad they record no graph.
        embeddings = [(p, p.requires_grad) for p in self._frozen_embeddings()]
        for p, _ in embeddings:
            p.requires_grad_(False)
        self.model.blocks.alast_planned = True
        self.overhead_seconds += time.perf_counter() - start
        try:
            yield plan
            if update:
                start = time.perf_counter()
                self._finish(plan)
                self.overhead_seconds += time.perf_counter() - start
        finally:
            self.model.blocks.alast_planned = False
            for blk in self.blocks:
                blk.alast_plan = None
            for p, requires_grad in embeddings:
                p.requires_grad_(requires_grad)

    def _finish(self, plan: StepPlan) -> None:
        stats = torch.stack([blk.alast_stats.to("cpu", torch.float64) for blk in self.blocks])  # one sync
        missing = [i for i, forwards in enumerate(stats[:, 1].tolist()) if forwards == 0]
        if missing:
            raise RuntimeError(f"ALaST.step(): blocks {missing} ran no forward pass inside the step")
        deltas = (stats[:, 0] / stats[:, 1]).tolist()
        keeps = [round(k) for k in (stats[:, 2] / stats[:, 1]).tolist()]
        if self.process_group is not None:
            deltas = distributed.mean_over_ranks(deltas, self.process_group)
        self.history.append({
            "step": plan.step, "keep_ratio": plan.keep_ratios, "keep": keeps,
            "train": plan.train, "budget": plan.budgets, "delta": deltas,
        })
        if self.policy == "alast":
            self.budgets = policies.alast_update(self.budgets, deltas, self.alpha)
        elif self.policy == "paper" and self.previous_deltas is not None:
            self.budgets = policies.paper_update(self.budgets, deltas, self.previous_deltas, self.alpha)
        self.previous_deltas = deltas
        self.step_count += 1
        self._pending = None

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict:
        """Everything a resumed run needs to make the same plans as an uninterrupted one."""
        return {
            **self._config(), "budgets": list(self.budgets),
            "previous_deltas": None if self.previous_deltas is None else list(self.previous_deltas),
            "step": self.step_count, "history": list(self.history),
            "generator": self._generator_state if self._pending is not None else self.generator.get_state(),
        }

    def _config(self) -> Dict:
        return {"policy": self.policy, "num_layers": len(self.blocks), "token_budget": self.token_budget,
                "train_layers": self.train_layers, "alpha": self.alpha, "min_keep": self.min_keep,
                "sample": self.sample, "train_embeddings": self.train_embeddings}

    def load_state_dict(self, state: Dict) -> None:
        """Resume from :meth:`state_dict`; ``ValueError`` naming each setting in which the saved controller
        differs from this one (its plans would not be this controller's)."""
        mine = self._config()
        differ = [f"{k}={state.get(k, '<missing>')!r} (this controller: {mine[k]!r})" for k in _CONFIG
                  if state.get(k, "<missing>") != mine[k]]
        if differ:
            raise ValueError(f"state: saved by a controller with {', '.join(differ)}")
        self.budgets = [float(v) for v in state["budgets"]]
        prev = state["previous_deltas"]
        self.previous_deltas = None if prev is None else [float(v) for v in prev]
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self.history = list(state.get("history", []))
        self._pending = None
