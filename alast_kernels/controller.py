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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import cost, distributed, policies
from .block import TOKEN_MODES, BlockPlan, ViTBlock, keep_count, new_stats, read_stats
from .convert import convert
from ._validate import check_fraction, check_int, check_real, check_reals
from .vit import embedding_parameters, find_vit, model_blocks

__all__ = ["ALaST", "StepPlan", "UNSET"]

POLICIES = ("alast", "paper", "fixed")
# What a saved state must agree on with the controller that loads it.
_CONFIG = ("policy", "num_layers", "token_budget", "flop_budget", "train_layers", "alpha", "min_keep", "sample",
           "train_embeddings", "tokens")


class _Unset:
    """The default of an option whose absence differs from any value (a policy that ignores the option
    refuses it only when it is given)."""

    def __repr__(self) -> str:
        return "<default>"


UNSET = _Unset()


def default_train_layers(num_layers: int) -> int:
    """How many of ``num_layers`` blocks train each step unless told: ``ceil(0.75·L)``, the authors' 9 of 12."""
    return math.ceil(0.75 * num_layers)


@dataclass(frozen=True)
class StepPlan:
    """The plans of one step, one entry per block.

    keep_ratios: the fraction of the model's non-prefix tokens each block processes (with ``tokens="drop"``
    these never grow through depth); train, grad_input: as :class:`BlockPlan`'s; budgets: the budgets the
    plan was made from; blocks: the :class:`BlockPlan` each block runs.
    """
    step: int
    keep_ratios: List[float]
    train: List[bool]
    grad_input: List[bool]
    budgets: List[float]
    tokens: str = "carry"
    blocks: Tuple[BlockPlan, ...] = ()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class ALaST:
    """Adaptive Layer Selection for a timm ``VisionTransformer`` (docs/alast.md §2).

    Args:
        model: a timm ``VisionTransformer`` with a class token, or a module holding one — a
            ``DistributedDataParallel`` (with ``find_unused_parameters=True``), a peft model, a
            ``torch.compile`` wrapper. Its blocks are converted to :class:`ViTBlock` in place if they are
            not already.
        token_budget: mean keep ratio over the blocks, in (0, 1] (``"alast"`` policy; default 0.6 unless
            ``flop_budget`` is given). Refused by the policies that ignore it.
        flop_budget: instead of ``token_budget`` (``"alast"`` policy): the step's forward+backward FLOPs as a
            fraction of full fine-tuning's, in (0, 1]; each plan's keep ratios are the largest that stay at or
            under it (docs/alast.md, "Compute budgets").
        train_layers: how many blocks train each step, in [1, L]; default ``ceil(0.75·L)``.
        policy: ``"alast"`` (default), ``"paper"`` (the authors' algorithm) or ``"fixed"``.
        alpha: budget update rate: ``"alast"``: in (0, 1], default 0.1; ``"paper"``: the optimizer's learning
            rate, required, > 0.
        min_keep: the lowest keep ratio a block gets, in (0, 1], default 0.2; at most ``token_budget``
            (``"alast"`` only).
        sample: draw the trained blocks with probability ∝ budget instead of taking the highest
            (``"paper"`` always draws, with probabilities ``softmax(b)``).
        seed: seed of the sampling generator.
        train_embeddings: whether the patch/position embeddings and prefix tokens train. ``None`` (the
            default): they do when any of them requires grad at construction, as in full fine-tuning, and
            do not when they are frozen (as peft LoRA leaves them). When they do not, they and every block
            below the lowest trained one run with no autograd graph. The final norm and the head always
            train.
        keep_ratios, train: the per-block keep ratios and trained flags of the ``"fixed"`` policy.
        tokens: ``"carry"`` (unkept tokens pass through a block) or ``"drop"`` (the sequence shrinks through
            depth); default ``"drop"`` (measured closest to full fine-tuning at equal FLOPs), ``"carry"`` for
            ``"fixed"``.
        process_group: the ranks that must agree on every plan when ``torch.distributed`` is initialised
            (default: the world). Their block importances are averaged before each budget update and
            rank 0's ``seed`` seeds the sampling everywhere.
    """

    def __init__(self, model: nn.Module, token_budget=UNSET, train_layers: Optional[int] = None,
                 policy: str = "alast", alpha=UNSET, min_keep=UNSET, sample: bool = False,
                 seed: int = 0, train_embeddings: Optional[bool] = None, keep_ratios: Optional[Sequence[float]] = None,
                 train: Optional[Sequence[bool]] = None, process_group=None, tokens: Optional[str] = None,
                 flop_budget=None):
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
        vit = find_vit(model)
        distributed.check_wrapper(model, "ALaST")
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("model: ALaST scores tokens by the class token's attention, and this model has no "
                             "class token (cls_token is None)")
        L = len(model_blocks(vit))
        self.policy = policy
        if tokens is None:
            tokens = "carry" if policy == "fixed" else "drop"  # drop: measured best (docs/alast.md)
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens: expected one of {', '.join(TOKEN_MODES)}, got {tokens!r}")
        self.tokens = tokens
        drop = tokens == "drop"
        self._check_ignored(token_budget=token_budget, flop_budget=flop_budget, min_keep=min_keep, alpha=alpha)
        if policy == "alast":
            if token_budget is not UNSET and flop_budget is not None:
                raise ValueError("token_budget, flop_budget: give one of them (a flop_budget replaces the token "
                                 "budget), not both")
            self.flop_budget = None if flop_budget is None else check_fraction("flop_budget", flop_budget)
            self.token_budget = None if self.flop_budget is not None else \
                check_fraction("token_budget", 0.6 if token_budget is UNSET else token_budget)
            self.alpha = check_fraction("alpha", 0.1 if alpha is UNSET else alpha)
            self.min_keep = check_fraction("min_keep", 0.2 if min_keep is UNSET else min_keep)
            if self.token_budget is not None:
                if self.min_keep > self.token_budget:
                    raise ValueError(f"min_keep: expected at most token_budget={self.token_budget}, got {min_keep}")
                lowest = policies.lowest_mean(L, self.min_keep, drop)
                if self.token_budget < lowest - 1e-12:
                    raise ValueError(f"token_budget: with tokens='drop' the first block processes every token, so "
                                     f"the mean keep ratio is at least (1 + (L-1)·min_keep)/L = {lowest:.4g}; got "
                                     f"{self.token_budget}")
        else:
            self.token_budget = self.flop_budget = self.min_keep = None
            self.alpha = None
            if policy == "paper":
                if alpha is UNSET:
                    raise ValueError("alpha: the 'paper' policy updates budgets at the optimizer's learning rate; "
                                     "pass it (alpha=lr)")
                self.alpha = check_real("alpha", alpha, 0, low_open=True)
        if train_layers is None:
            train_layers = default_train_layers(L)
        self.train_layers = check_int("train_layers", train_layers, 1, L, note=f" (the model has {L} blocks)")
        self.sample = bool(sample) or policy == "paper"
        self.seed = check_int("seed", seed)
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
            self.keep_ratios = [check_fraction(f"keep_ratios[{i}]", r) for i, r in enumerate(keep_ratios)]
            if drop and (self.keep_ratios[0] != 1
                         or any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:]))):
                raise ValueError(f"keep_ratios: with tokens='drop' the first block processes every token (1.0) and "
                                 f"no later block more than the one before it, got {list(keep_ratios)}")
            self.train_flags = [bool(t) for t in train]
        elif keep_ratios is not None or train is not None:
            raise ValueError(f"keep_ratios, train: only the 'fixed' policy takes them (policy={policy!r})")
        self.dims = None
        if self.flop_budget is not None:
            self.dims = cost.ViTDims.of(vit)
            self._check_flop_budget(L)
        # Converted only once every argument is known good: a rejected controller leaves the model alone.
        convert(vit)
        self.model = vit  # the timm VisionTransformer planned
        self.blocks: List[ViTBlock] = list(vit.blocks)
        self.num_prefix = int(vit.num_prefix_tokens)
        # Keep counts are made for the model's patch count; with dynamic image sizes, at forward time.
        self.num_patches: Optional[int] = None if getattr(vit, "dynamic_img_size", False) \
            else int(vit.patch_embed.num_patches)
        self.process_group = distributed.active_group(process_group)
        if self.process_group is not None:
            self.seed = distributed.agree_on_seed(self.seed, self.process_group)

        start = policies.PAPER_START if policy == "paper" else 1.0
        self.budgets: List[float] = [start] * L
        # The authors' Δ_{-1} = 0: their first step updates too.
        self.previous_deltas: Optional[List[float]] = [0.0] * L if policy == "paper" else None
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history: List[Dict] = []
        self.overhead_seconds = 0.0  # time spent in the controller's own bookkeeping
        self._pending: Optional[StepPlan] = None
        self._generator_state: Optional[torch.Tensor] = None  # generator state the pending plan was drawn from
        self._in_step = False

    def _check_ignored(self, **given) -> None:
        """Refuse an option the policy ignores when the caller gave it (it would silently do nothing)."""
        takes = {"alast": ("token_budget", "flop_budget", "min_keep", "alpha"), "paper": ("alpha",), "fixed": ()}
        ignored = [name for name, value in given.items()
                   if value is not UNSET and value is not None and name not in takes[self.policy]]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: the {self.policy!r} policy ignores "
                             f"{'it' if len(ignored) == 1 else 'them'}; leave {'it' if len(ignored) == 1 else 'them'} "
                             f"out (the policy's keep ratios come from "
                             f"{'its budgets' if self.policy == 'paper' else 'keep_ratios'})")

    def _check_flop_budget(self, L: int) -> None:
        """``ValueError`` when some plan could not reach ``flop_budget`` even at ``min_keep``: the dearest plan
        trains the lowest blocks (every block above them then builds a graph)."""
        train = [l < self.train_layers for l in range(L)]
        grad_input = [self.train_embeddings or any(train[:l]) for l in range(L)]
        ratios = policies.scaled_ratios([1.0] * L, 0.0, self.min_keep, self.tokens == "drop")
        lowest = self._flop_fraction(ratios, train, grad_input)
        if lowest > self.flop_budget:
            raise ValueError(f"flop_budget: expected at least {lowest:.4f}, the FLOPs (as a fraction of full "
                             f"fine-tuning's) of a step that trains the {self.train_layers} lowest blocks at "
                             f"min_keep={self.min_keep}; got {self.flop_budget}")

    def _flop_fraction(self, ratios: Sequence[float], train: Sequence[bool], grad_input: Sequence[bool]) -> float:
        Np = self.dims.num_patches
        processed = [keep_count(r, Np) for r in ratios]
        return cost.flop_fraction(self.dims, processed, train, grad_input, self.train_embeddings, self.tokens)

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
        L, drop = len(b), self.tokens == "drop"
        if self.policy == "fixed":
            train = list(self.train_flags)
        elif self.policy == "paper":
            train = policies.softmax_layers(b, self.train_layers, self.generator)
        elif self.sample:
            train = policies.sample_layers(b, self.train_layers, self.generator)
        else:
            train = policies.top_layers(b, self.train_layers)
        grad_input = [self.train_embeddings or any(train[:l]) for l in range(L)]
        if self.policy == "paper":
            blocks, processed = self._paper_blocks(train, grad_input)
            ratios = [k / int(self.model.patch_embed.num_patches) for k in processed]
        else:
            if self.policy == "fixed":
                ratios = list(self.keep_ratios)
            elif self.flop_budget is not None:
                ratios = policies.fill(b, self.min_keep, lambda r: self._flop_fraction(r, train, grad_input),
                                       self.flop_budget, drop, at_most=True)
            else:
                ratios = policies.water_fill(b, self.token_budget, self.min_keep, drop)
            blocks = self._ratio_blocks(ratios, train, grad_input)
        return StepPlan(self.step_count, ratios, train, grad_input, list(b), self.tokens, tuple(blocks))

    def _ratio_blocks(self, ratios: Sequence[float], train, grad_input) -> List[BlockPlan]:
        """Block plans from the fractions of the model's patches each block processes."""
        Np = self.num_patches
        if self.tokens == "carry":
            return [BlockPlan(r, t, g, Np) for r, t, g in zip(ratios, train, grad_input)]
        # Drop: block l processes what block l-1 passed on, and passes on what block l+1 processes.
        counts = [keep_count(r, int(self.model.patch_embed.num_patches)) for r in ratios]
        passed = counts[1:] + counts[-1:]
        return [BlockPlan(p / k, t, g, None if Np is None else k, tokens="drop")
                for k, p, t, g in zip(counts, passed, train, grad_input)]

    def _paper_blocks(self, train, grad_input) -> Tuple[List[BlockPlan], List[int]]:
        """The authors' rule: after block l the prefix and ``int(b_l · n_l)`` others go on (``n_l``: block l's
        tokens, prefix included); in carry mode block l processes that many of all the patch tokens. Returns
        the block plans and each block's processed non-prefix tokens at the model's patch count."""
        plans, processed = [], []
        Np = m = int(self.model.patch_embed.num_patches)
        for b, t, g in zip(self.budgets, train, grad_input):
            if self.tokens == "carry":
                plans.append(BlockPlan(b, t, g, self.num_patches, keep_rule="paper", num_prefix=self.num_prefix))
                processed.append(keep_count(b, Np, "paper", self.num_prefix))
            else:
                plans.append(BlockPlan(b, t, g, None if self.num_patches is None else m, tokens="drop",
                                       keep_rule="paper", num_prefix=self.num_prefix))
                processed.append(m)
                m = keep_count(b, m, "paper", self.num_prefix)
        return plans, processed

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
        if self._in_step:
            raise RuntimeError("ALaST.step(): already inside a step of this controller (nested step()); the inner "
                               "step would clear the outer step's plans. Run every micro-batch of an optimizer "
                               "step inside one `with alast.step():`")
        if any(blk.alast_plan is not None for blk in self.blocks):
            raise RuntimeError("ALaST.step(): another controller's step is applied to these blocks (two ALaST "
                               "controllers on one model); its plans would be replaced by this one's. Use one "
                               "controller per model, or finish the other step first")
        start = time.perf_counter()
        plan = self.plan()
        self._clear_gradients(self._frozen_parameters(plan))
        for blk, block_plan in zip(self.blocks, plan.blocks):
            blk.alast_plan = block_plan
            blk.alast_stats = new_stats(_device(blk))
        # Nothing below the embeddings needs their gradient: without requires_grad they record no graph.
        embeddings = [(p, p.requires_grad) for p in self._frozen_embeddings()]
        for p, _ in embeddings:
            p.requires_grad_(False)
        self.model.blocks.alast_planned = True
        self._in_step = True
        self.overhead_seconds += time.perf_counter() - start
        try:
            yield plan
            if update:
                start = time.perf_counter()
                self._finish(plan)
                self.overhead_seconds += time.perf_counter() - start
        finally:
            self._in_step = False
            self.model.blocks.alast_planned = False
            for blk in self.blocks:
                blk.alast_plan = None
            for p, requires_grad in embeddings:
                p.requires_grad_(requires_grad)

    def _finish(self, plan: StepPlan) -> None:
        stats = read_stats(torch.stack([blk.alast_stats.to("cpu", torch.float64) for blk in self.blocks]))  # one sync
        missing = [i for i, forwards in enumerate(stats.forwards.tolist()) if forwards == 0]
        if missing:
            raise RuntimeError(f"ALaST.step(): blocks {missing} ran no forward pass inside the step")
        # Δ per forward, averaged over the step's forwards (micro-batches; checkpointing's recomputation):
        # the authors' sums over the images of a batch, the library's own policy averages over them.
        deltas = (stats.summed_delta if self.policy == "paper" else stats.mean_delta).tolist()
        keeps = [round(k) for k in stats.processed.tolist()]
        if self.process_group is not None:
            deltas = distributed.mean_over_ranks(deltas, self.process_group)
        self.history.append({
            "step": plan.step, "keep_ratio": plan.keep_ratios, "keep": keeps,
            "train": plan.train, "budget": plan.budgets, "delta": deltas,
        })
        if self.policy == "alast":
            self.budgets = policies.alast_update(self.budgets, deltas, self.alpha)
        elif self.policy == "paper":
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
                "flop_budget": self.flop_budget, "train_layers": self.train_layers, "alpha": self.alpha,
                "min_keep": self.min_keep, "sample": self.sample, "train_embeddings": self.train_embeddings,
                "tokens": self.tokens}

    def load_state_dict(self, state: Dict) -> None:
        """Resume from :meth:`state_dict`; ``ValueError`` naming each setting in which the saved controller
        differs from this one (its plans would not be this controller's), and naming any entry that is
        missing or malformed. Everything is checked before anything changes."""
        if not isinstance(state, dict):
            raise ValueError(f"state: expected the dict of ALaST.state_dict(), got a {type(state).__name__}")
        mine = self._config()
        differ = [f"{k}={state.get(k, '<missing>')!r} (this controller: {mine[k]!r})" for k in _CONFIG
                  if state.get(k, "<missing>") != mine[k]]
        if differ:
            raise ValueError(f"state: saved by a controller with {', '.join(differ)}")
        missing = [k for k in ("budgets", "previous_deltas", "step", "generator") if k not in state]
        if missing:
            raise ValueError(f"state: missing {', '.join(missing)}")
        L = len(self.blocks)
        lo, hi = policies.PAPER_RANGE if self.policy == "paper" else (0.0, math.inf)
        budgets = check_reals("state['budgets']", state["budgets"], L, lo, hi)
        prev = state["previous_deltas"]
        if prev is None and self.policy == "paper":
            raise ValueError("state['previous_deltas']: the 'paper' policy needs the previous step's Δ, got None")
        prev = None if prev is None else check_reals("state['previous_deltas']", prev, L, 0.0)
        step = check_int("state['step']", state["step"], 0)
        generator = state["generator"]
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
            raise ValueError(f"state['generator']: expected the uint8 tensor of torch.Generator.get_state(), "
                             f"got {type(generator).__name__}")
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ValueError("state['history']: expected a list of dicts (one per step)")
        probe = torch.Generator()
        try:
            probe.set_state(generator)
        except RuntimeError as e:
            raise ValueError(f"state['generator']: not a CPU generator state ({e})") from None
        self.budgets, self.previous_deltas, self.step_count = budgets, prev, int(step)
        self.generator.set_state(generator)
        self.history = list(history)
        self._pending = None
