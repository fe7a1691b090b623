"""The contract every fine-tuning method keeps, and the registry that names them.

::

    method = ak.methods.create("sparse_tuning", model)      # ak.methods.available() lists the names
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    for x, y in loader:
        with method.step():                                  # one optimizer step; may hold several
            F.cross_entropy(method.model(x), y).backward()   # forward/backward micro-batches
        opt.step(); opt.zero_grad(set_to_none=True)

A method owns which parameters train (``requires_grad``), what happens around a step (plans, schedules)
and its own state (:meth:`Method.state_dict`: schedules, budgets, generators — the weights are in
``method.model.state_dict()`` and the optimizer's in its own).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Type

import torch
import torch.nn as nn

from ..vit import find_vit

__all__ = ["Method", "register", "available", "create", "options_of", "set_trainable"]

_REGISTRY: Dict[str, Type["Method"]] = {}


def register(cls: Type["Method"]) -> Type["Method"]:
    """Class decorator: make ``cls`` available to :func:`create` under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"{cls.__name__}.name: expected a new method name, got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> List[str]:
    """The method names :func:`create` accepts, in the order they were registered."""
    return list(_REGISTRY)


def create(name: str, model: nn.Module, **options) -> "Method":
    """The method ``name`` over ``model`` (a timm ``VisionTransformer``, or a DDP/peft/compile wrapper of one).

    Options are the method class's keyword arguments; an unknown one raises ``TypeError`` naming it and
    listing the method's options.
    """
    if name not in _REGISTRY:
        raise ValueError(f"name: expected one of {', '.join(available())}, got {name!r}")
    cls = _REGISTRY[name]
    accepted = options_of(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; {name} takes "
                        f"{', '.join(accepted) or 'no options'}")
    return cls(model, **options)


def options_of(cls: Type["Method"]) -> List[str]:
    """The keyword options of method class ``cls``: its ``__init__``'s, and its bases' where it passes
    ``**kwargs`` on."""
    names: List[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name not in ("self", "model") and p.name not in names
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def set_trainable(module: nn.Module, trainable: Iterable[nn.Parameter]) -> None:
    """``requires_grad`` on for exactly the parameters in ``trainable``, off for every other one of ``module``."""
    chosen = {id(p) for p in trainable}
    for p in module.parameters():
        p.requires_grad_(id(p) in chosen)


class Method:
    """Base of a fine-tuning method over a timm ``VisionTransformer``.

    Attributes:
        model: the ``nn.Module`` to call, ``logits = method.model(images)`` — the model that was passed in
            (possibly converted in place) or a new module around it.
        vit: the timm ``VisionTransformer`` inside ``model``.

    Subclasses set :attr:`name`, mark their trainable parameters in ``__init__`` and override
    :meth:`step`, :meth:`state_dict` and :meth:`load_state_dict` when they keep state across steps.
    """

    name: ClassVar[str] = ""
    #: What the method is, in one line (``python -m alast_kernels.info`` and the job print it).
    summary: ClassVar[str] = ""
    #: Whether the backbone's weights train (full fine-tuning's learning rate suits it) or stay frozen while
    #: small added parts train (adapters, queries, side networks, heads: a larger learning rate suits them).
    trains_backbone: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.vit = find_vit(model)
        self.model = model

    # --------------------------------------------------------------------------------- parameters
    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters the optimizer should update (``requires_grad``); nothing else changes."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # --------------------------------------------------------------------------------------- step
    @contextlib.contextmanager
    def step(self, update: bool = True) -> Iterator[None]:
        """One optimizer step's forward/backward passes run inside this context.

        ``update=False`` runs a step without advancing the method's state (for measuring a step).
        """
        self._check_training()
        yield None

    def _check_training(self) -> None:
        if not self.model.training:
            raise RuntimeError(f"{self.name}: step() needs the model in training mode; call "
                               f"method.model.train() first")

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict:
        """The method's own state (not the weights): enough to resume and make the same choices."""
        return {"method": self.name}

    def load_state_dict(self, state: Dict) -> None:
        if not isinstance(state, dict) or state.get("method") != self.name:
            saved = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: saved by method {saved!r}, this is {self.name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, trainable={self.num_trainable():,})"
