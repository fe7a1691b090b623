"""The compiled extension ``alast_kernels._C``: whether it was built, for what, and loading it safely.

``setup.py`` writes ``_build_info.py`` next to this file with the torch, CUDA and Python versions the
extension was compiled for. :func:`check_build` compares them with the running ones without loading any
shared library (cheap enough for ``import alast_kernels``); :func:`load` imports ``_C``. A mismatch or a
failed load gives ONE warning that names both sides, and the ``cuda`` backend is then unavailable (ops
fall back to ``triton``/``reference``) instead of failing with an undefined-symbol error.

With ``ALAST_CUDA_EMULATION=1``, :func:`load` loads the emulated kernels instead
(:mod:`alast_kernels._cuda_emulation`): both register ``torch.ops.alast``, so one process has one of them.
"""
from __future__ import annotations

import importlib
import platform
import sys
import warnings
from typing import Dict, Optional

import torch

from . import _cuda_emulation

_REBUILD = ("reinstall alast_kernels for this environment (pip install --no-build-isolation . with "
            "ALAST_FORCE_CUDA=1 without a GPU, or the wheel built for this torch and CUDA)")

_warned = False
_loaded = False


def build_info() -> Optional[Dict[str, object]]:
    """What ``setup.py`` recorded, or ``None`` for a source tree that was never built."""
    try:
        module = importlib.import_module("alast_kernels._build_info")
    except ImportError:
        return None
    return {key: value for key, value in vars(module).items() if key.isupper()}


def running() -> Dict[str, object]:
    """The versions this process runs with, under the names ``_build_info`` uses."""
    return {
        "TORCH_VERSION": torch.__version__,
        "CUDA_VERSION": torch.version.cuda,
        "PYTHON_VERSION": ".".join(platform.python_version_tuple()[:2]),
    }


def _minor(version: Optional[str]) -> Optional[str]:
    """``"2.14.1+cu130"`` -> ``"2.14"``; the C++ ABI of torch and CUDA is kept within a minor release."""
    if version is None:
        return None
    return ".".join(str(version).split("+")[0].split(".")[:2])


def _cuda_major(version: Optional[str]) -> Optional[str]:
    return None if version is None else str(version).split(".")[0]


def _describe(info: Dict[str, object]) -> str:
    return (f"torch {info.get('TORCH_VERSION')}, CUDA {info.get('CUDA_VERSION')}, "
            f"Python {info.get('PYTHON_VERSION')}")


def mismatch(info: Optional[Dict[str, object]] = None) -> Optional[str]:
    """Why the built extension cannot run in this process (``None`` when it can, or when none was built)."""
    info = build_info() if info is None else info
    if not info or not info.get("EXTENSION"):
        return None
    now = running()
    if (_minor(info.get("TORCH_VERSION")) != _minor(now["TORCH_VERSION"])
            or _cuda_major(info.get("CUDA_VERSION")) != _cuda_major(now["CUDA_VERSION"])
            or info.get("PYTHON_VERSION") != now["PYTHON_VERSION"]):
        return (f"alast_kernels._C was built for {_describe(info)} (arch {info.get('ARCH_LIST')}) but this "
                f"process runs {_describe(now)}")
    return None


def _warn(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"{message}; the 'cuda' backend is disabled and ops fall back to triton/reference. "
                      f"To use it, {_REBUILD}.", RuntimeWarning, stacklevel=3)


def check_build() -> Optional[str]:
    """At import: warn once if the recorded build does not match this process. Loads nothing."""
    reason = mismatch()
    if reason is not None:
        _warn(reason)
    return reason


def load() -> None:
    """Import ``alast_kernels._C`` (registering ``torch.ops.alast``), or the emulated kernels under
    ``ALAST_CUDA_EMULATION=1``; ``ImportError`` with the reason if it cannot be used. A mismatch or a failed
    load of ``_C`` also warns once; an install built without the extension does not (that was asked for)."""
    global _loaded
    if _loaded:
        return
    if _cuda_emulation.requested():
        if "alast_kernels._C" in sys.modules:
            raise ImportError(f"{_cuda_emulation.ENV}=1 but alast_kernels._C is already loaded in this process; "
                              "choose the emulation before the first cuda op runs")
        _cuda_emulation.load()
        _loaded = True
        return
    if _cuda_emulation.loaded():
        raise ImportError(f"the CUDA emulation is loaded in this process ({_cuda_emulation.ENV} was set when the "
                          "first cuda op ran): alast_kernels._C cannot be loaded beside it")
    info = build_info()
    if not info or not info.get("EXTENSION"):
        raise ImportError("alast_kernels was installed without its CUDA extension (no CUDA toolkit or GPU at "
                          "build time, or ALAST_SKIP_CUDA=1)")
    reason = mismatch(info)
    if reason is not None:
        _warn(reason)
        raise ImportError(reason)
    try:
        importlib.import_module("alast_kernels._C")
    except Exception as exc:  # OSError / ImportError: undefined symbols, a missing libcudart, no file ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = (f"alast_kernels._C, built for {_describe(info)}, failed to load in this process "
                  f"({_describe(running())}): {detail}")
        _warn(reason)
        raise ImportError(reason) from None
    _loaded = True
