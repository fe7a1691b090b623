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
import copy
import functools
import inspect
from typing import Callable, ClassVar, Dict, Iterable, Iterator, List, Type

import torch.nn as nn

from ..vit import find_vit

__all__ = ["Method", "ModelState", "register", "available", "method_class", "create", "options_of",
           "set_trainable"]

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


def method_class(name: str) -> Type["Method"]:
    """The class registered as ``name``; ``ValueError`` listing the names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"name: expected one of {', '.join(available())}, got {name!r}")
    return _REGISTRY[name]


def create(name: str, model: nn.Module, **options) -> "Method":
    """The method ``name`` over ``model`` (a timm ``VisionTransformer``, or a DDP/peft/compile wrapper of one).

    Options are the method class's keyword arguments; an unknown one raises ``TypeError`` naming it and
    listing the method's options.
    """
    cls = method_class(name)
    accepted = options_of(cls)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; {name} takes "
                        f"{', '.join(accepted) or 'no options'}")
    before = ModelState(model) if isinstance(model, nn.Module) else None
    try:
        return cls(model, **options)
    except BaseException:
        # A method may refuse an option after it has already changed the model (requires_grad flags, blocks
        # converted, peft adapters injected, eval mode): the refused creation must leave nothing behind.
        if before is not None:
            before.restore()
        raise


def options_of(cls: Type["Method"]) -> List[str]:
    """The keyword options of method class ``cls``: its ``__init__``'s, and its bases' where it passes
    ``**kwargs`` on; a class whose ``option_source`` names the callable it passes its options to (as
    ``alast`` passes them to the controller) has that callable's."""
    names: List[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())
        if "option_source" in vars(klass):
            params += list(inspect.signature(vars(klass)["option_source"]).parameters.values())
        names += [p.name for p in params if p.name not in ("self", "model") and p.name not in names
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


class ModelState:
    """Everything of ``model`` that building a method may change, captured so it can be put back exactly.

    Per module: its class (``convert`` swaps it), its attributes (mode, ALaST state, what peft adds) and the
    contents of its containers — children, parameters, buffers, hooks — restored into the same dict objects
    so that hook handles taken before stay valid. Per parameter: ``requires_grad``. Tensor values are not
    captured: no method writes into the weights it is given while it is being built.
    """

    def __init__(self, model: nn.Module):
        self._modules = []
        for module in model.modules():
            attrs = dict(vars(module))
            contents = {key: copy.copy(value) for key, value in attrs.items() if isinstance(value, (dict, set, list))}
            self._modules.append((module, type(module), attrs, contents))
        self._flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, cls, attrs, contents in self._modules:
            module.__class__ = cls
            current = vars(module)
            current.clear()
            current.update(attrs)
            for key, saved in contents.items():
                container = attrs[key]
                container.clear()
                (container.extend if isinstance(container, list) else container.update)(saved)
        for p, flag in self._flags:
            p.requires_grad_(flag)


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

    #: The mode the ViT's own modules run in during a step: training (dropout, drop-path on) for a method
    #: that runs the backbone as part of what it trains; eval for a frozen feature extractor, which the
    #: method's model keeps in eval mode (``FrozenBackboneModel.train``).
    backbone_training: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "step" in vars(cls):
            # Every method's step checks the modes first, whether it builds on `Method.step` or not (the
            # ALaST methods hand over to the controller's own step).
            cls.step = _checking_modes(vars(cls)["step"])

    def __init__(self, model: nn.Module):
        self.vit = find_vit(model)
        self.model = model

    @classmethod
    def run_options(cls, steps: int) -> Dict:
        """The options that depend on the run, for a run of ``steps`` optimizer steps (a schedule's length);
        a job passes them to :func:`create` unless it sets them itself. None by default."""
        return {}

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
        """``RuntimeError`` unless ``model`` is in training mode and every module of the ViT in
        :attr:`backbone_training`'s mode. ``model`` may be a new module around the user's ViT, so a
        ``vit.eval()`` on the model that was passed in does not show in ``model.training``."""
        if not self.model.training:
            raise RuntimeError(f"{self.name}: step() needs the model in training mode; call "
                               f"method.model.train() first")
        wrong = next((name or "the ViT" for name, m in self.vit.named_modules()
                      if m.training != self.backbone_training), None)
        if wrong is None:
            return
        if self.backbone_training:
            raise RuntimeError(f"{self.name}: step() needs the ViT in training mode, but {wrong} is in eval "
                               f"mode (was .eval() called on the model passed in?); call method.model.train() "
                               f"first")
        raise RuntimeError(f"{self.name}: the frozen backbone runs in eval mode, but {wrong} is in training "
                           f"mode (was .train() called on the model passed in?); call method.model.train(), "
                           f"which keeps the backbone in eval mode")

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


def _checking_modes(step: Callable) -> Callable:
    """``step`` that first checks the modes (:meth:`Method._check_training`)."""
    @functools.wraps(step)
    def checked(self: Method, *args, **kwargs):
        self._check_training()
        return step(self, *args, **kwargs)
    return checked
