"""Backend selection: which implementation of each op runs, decided from the backends' declarations.

Three backends implement the op contracts of :mod:`alast_kernels.ops`:

``reference``  pure PyTorch, any device and dtype; the oracle the others are tested against.
``triton``     fused Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
``cuda``       the compiled extension ``alast_kernels._C`` (CUDA tensors; CPU tensors under
               ``ALAST_CUDA_EMULATION=1``, see :mod:`alast_kernels._cuda_emulation`).

Each backend declares, per op, what it runs (:mod:`alast_kernels.backends.support`). For every call
:func:`implementation` walks the candidates — the forced backend first, then the ``auto`` order for the
device — and takes the first one that can run it; the others are skipped with a reason. Falling back to
something other than what was asked for (a forced backend that cannot run the call, or ``auto`` ending on
the slow reference on a GPU) warns once per op and reason, here and nowhere else.

Backend modules are imported lazily, on the first call that may use them, so importing ``alast_kernels``
never compiles or loads a kernel.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import backends as _package
from .backends import BACKENDS, measured
from .backends.support import Call, Supports, dtype_name

_CHOICES = ("auto",) + BACKENDS

_selected: Optional[str] = None
_import_errors: Dict[str, str] = {}  # backends whose import failed, and why: not tried again
_warned: set = set()


def _env_backend() -> str:
    name = os.environ.get("ALAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in _CHOICES:
        raise ValueError(f"ALAST_BACKEND={name!r}: expected one of {', '.join(_CHOICES)}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every op: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Overrides the ``ALAST_BACKEND`` environment variable for this process.
    """
    global _selected
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"set_backend(name={name!r}): expected one of {', '.join(_CHOICES)}")
    _selected = name.lower()


def get_backend() -> str:
    """The backend chosen by :func:`set_backend`, else by ``ALAST_BACKEND``, else ``"auto"``."""
    return _selected if _selected is not None else _env_backend()


def load(name: str):
    """Backend module ``name``, imported once; ``None`` (with the reason kept) when it is absent.

    Absent means not installed or not built: the import raised ``ImportError`` for a module outside this
    package (``triton`` missing or broken) or with no module named (the extension loader's "not built /
    built for another torch / failed to load"). Any other failure — an ``ImportError`` naming one of this
    package's own modules, an ``AttributeError``, a ``RuntimeError``, ... — is a bug in the backend and
    propagates with its traceback, every time the backend is asked for, forced or under ``auto``.

    The imported module is an attribute of the ``alast_kernels.backends`` package, and that is where
    :func:`implementation` finds it: under ``torch.compile`` a module attribute is read as it is when the
    lookup is traced, whereas a dict of loaded modules would be read as it was before the first import.
    """
    module = getattr(_package, name, None)
    if module is not None or name in _import_errors:
        return module
    try:
        return importlib.import_module(f"alast_kernels.backends.{name}")
    except ImportError as exc:
        if not _absent(exc):
            raise
        _import_errors[name] = f"{type(exc).__name__}: {exc}"
        return None


def _absent(exc: ImportError) -> bool:
    """Whether an import failure means "not installed or not built" rather than a bug in this package."""
    missing = exc.name  # the module that could not be found or imported from; None when not said
    return missing is None or not (missing == __package__ or missing.startswith(f"{__package__}."))


def import_error(name: str) -> Optional[str]:
    """Why backend ``name`` could not be imported (``None`` when it was, or was not tried yet)."""
    return _import_errors.get(name)


def declaration(module, op: str) -> Supports:
    """What ``module``'s implementation of ``op`` runs."""
    return module.SUPPORTS.get(op, module.DEFAULT_SUPPORT)


def refusal(name: str, op: str, call: Call) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` for ``call``; ``None`` when it can."""
    module = load(name)
    if module is None:
        return f"could not be loaded ({_import_errors[name]})"
    if op not in module.OPS:
        return f"has no {op} kernel"
    reasons = declaration(module, op).refusals(call)
    if not reasons:
        device = module.device_refusal(call.device)  # declared for this device, but not usable right now?
        reasons = [device] if device else []
    return "; ".join(reasons) or None


def candidates(op: str, device: str, choice: str) -> Tuple[str, ...]:
    """Backends to try, in order: the forced one first, then the ``auto`` order for ``device`` (on CUDA
    tensors the measured order for the present GPU family, else the vendor-first default: see
    :mod:`alast_kernels.backends.measured`)."""
    order = measured.cuda_order(op, measured.current_family())[0] if device == "cuda" else ("reference",)
    if choice == "auto":
        return order
    return (choice,) + tuple(name for name in order if name != choice)


def implementation(op: str, device, dtype: Optional[torch.dtype] = None, **facts) -> Callable:
    """The callable that runs ``op`` for a call on ``device`` computing in ``dtype`` (with the op's other
    facts, e.g. ``head_dim=64``, ``k_norm=False``: see :class:`~alast_kernels.backends.support.Call`)."""
    device_type = torch.device(device).type
    name = _choose(op, device_type, dtype_name(dtype), tuple(sorted(facts.items())), get_backend())
    return getattr(_package, name).OPS[op]


# Under torch.compile the choice (which imports backend modules on first use) runs eagerly at trace time
# and its result, a backend name, is baked into the graph: an import cannot be traced, even with
# fullgraph=True from a cold start. Its arguments (plain constants) are all it depends on, so the graph
# stays right; the module lookup happens outside, in `implementation` (see `load` for why it reads the
# package's attribute).
@torch._dynamo.assume_constant_result
def _choose(op: str, device: str, dtype: Optional[str], facts: tuple, choice: str) -> str:
    call = Call(device, dtype, **dict(facts))
    tried = candidates(op, device, choice)
    skipped: List[str] = []
    for name in tried:
        reason = refusal(name, op, call)
        if reason is None:
            if skipped and (choice != "auto" or name == "reference"):
                _warn_once(op, name, skipped)
            return name
        skipped.append(f"{name}: {reason}")
    raise RuntimeError(f"alast_kernels: no backend can run {op} on {device} ({'; '.join(skipped)})")


def _warn_once(op: str, name: str, skipped: List[str]) -> None:
    key = (op, name, tuple(skipped))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"alast_kernels: {op} falls back to the {name} backend ({'; '.join(skipped)})",
                      RuntimeWarning, stacklevel=4)
