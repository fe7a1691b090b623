"""Backend selection: which implementation of each op runs.

Three backends implement the op contracts of :mod:`alast_kernels.ops`:

``reference``  pure PyTorch, any device and dtype; the oracle the others are tested against.
``triton``     fused Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
``cuda``       the compiled extension ``alast_kernels._C`` (CUDA tensors).

Each backend is a module under ``alast_kernels.backends`` that defines

* ``OPS``: a dict from op name to a callable with the op's public signature, and
* ``supports(device) -> bool``: whether its kernels can run on tensors of ``device``.

Modules are imported lazily, on the first op call that may use them, so importing
``alast_kernels`` never compiles or loads a kernel. A backend that fails to import, lacks an op or cannot
run on a device is skipped; when that means running something slower than was asked for, a warning is
issued once per (backend, op, reason).
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("reference", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# `auto` tries these in order for tensors on a CUDA device; per-op entries override the default.
# The order records which backend measured faster for each op (README, "Backends").
AUTO_ORDER_CUDA: Dict[str, Tuple[str, ...]] = {}
_DEFAULT_CUDA_ORDER: Tuple[str, ...] = ("cuda", "triton", "reference")

_selected: Optional[str] = None
_modules: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}
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


def _load(name: str):
    """Import backend ``name`` once; ``None`` (with the reason kept) when it cannot be imported."""
    if name in _modules:
        return _modules[name]
    try:
        module = importlib.import_module(f"alast_kernels.backends.{name}")
    except Exception as exc:  # a missing triton, a failed extension load, ...: all mean "not available"
        _import_errors[name] = f"{type(exc).__name__}: {exc}"
        module = None
    _modules[name] = module
    return module


def unavailable_reason(name: str, op: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` on ``device``; ``None`` when it can."""
    module = _load(name)
    if module is None:
        return f"backend {name!r} could not be loaded ({_import_errors[name]})"
    if op not in module.OPS:
        return f"backend {name!r} has no {op!r} kernel"
    if not module.supports(device):
        return f"backend {name!r} does not run on {device.type} tensors"
    return None


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def implementation(op: str, device: torch.device) -> Callable:
    """The callable that runs ``op`` for tensors on ``device`` under the current backend choice."""
    return _modules[_choose(op, torch.device(device).type, get_backend())].OPS[op]


# Under torch.compile the choice (which imports backend modules on first use) runs eagerly at trace time
# and its result, a backend name, is baked into the graph: an import cannot be traced, even with
# fullgraph=True from a cold start. Its arguments are all it depends on, so the graph stays right.
@torch._dynamo.assume_constant_result
def _choose(op: str, device_type: str, choice: str) -> str:
    device = torch.device(device_type)
    if choice == "auto":
        if device.type == "cuda":
            candidates = AUTO_ORDER_CUDA.get(op, _DEFAULT_CUDA_ORDER)
        else:
            candidates = ("reference",)
    else:
        # A forced backend first; for an op it lacks, the next best that `auto` would use.
        rest = AUTO_ORDER_CUDA.get(op, _DEFAULT_CUDA_ORDER) if device.type == "cuda" else ("reference",)
        candidates = (choice,) + tuple(name for name in rest if name != choice)

    first_reason = None
    for name in candidates:
        reason = unavailable_reason(name, op, device)
        if reason is None:
            # A forced backend that cannot run warns; so does `auto` when it ends on the slow oracle.
            if first_reason is not None and (choice != "auto" or name == "reference"):
                _warn_once((candidates[0], op, first_reason),
                           f"alast_kernels: {op} falls back to the {name} backend: {first_reason}")
            return name
        first_reason = first_reason or reason
    raise RuntimeError(f"alast_kernels: no backend can run {op!r} on {device}: {first_reason}")
