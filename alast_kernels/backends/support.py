"""What an implementation runs: the declaration each implementation carries beside its code, and the facts
of a call it is checked against.

An implementation is declared where it is written, in a module of its backend package
(``alast_kernels/backends/<name>/<file>.py``)::

    @implements(max_head_dim=MAX_HEAD_DIM, how="flash forward/backward ...")
    def attention(q, k, v, scale, return_cls): ...

The function's name is the op's name (a contract of :mod:`alast_kernels.ops`); the keywords are the fields
of :class:`Supports` in which it differs from its backend's usual declaration (``how`` always). Each backend
package (``alast_kernels/backends/<name>/__init__.py``) then defines

``DEFAULT_SUPPORT``  the backend's usual :class:`Supports`;
``OPS, SUPPORTS``    ``collect(__name__, DEFAULT_SUPPORT)``: ``{op: callable}`` and ``{op: Supports}``, built
                     from the declarations of every module of the package (no table names the ops); an
                     op of ``OPS`` without a ``SUPPORTS`` entry runs what ``DEFAULT_SUPPORT`` says;
``DEVICES_NOTE``     where it runs, in a few words, for ``python -m alast_kernels.info``;
``device_refusal``   ``device_refusal(device_type) -> str | None``: why the backend cannot run on that kind of
                     device in this process (``None`` when it can), e.g. CPU tensors without the Triton
                     interpreter.

Implementations take the op's arguments already checked by :mod:`alast_kernels.ops`.
:mod:`alast_kernels.backend` picks, per call, the first backend in its order that has the op, runs on the
device and whose declaration accepts the :class:`Call`; nothing inside a backend falls back by itself.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

ANY_DEVICE = None
FLOAT_DTYPES: Tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")
GPU_DTYPES: Tuple[str, ...] = ("float32", "float16", "bfloat16")


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """``torch.float32`` -> ``"float32"`` (a plain string: a constant for ``torch.compile``)."""
    return None if dtype is None else str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Call:
    """The facts of one op call that decide which backend may run it; plain constants only.

    device: the device type of the op's tensors (``"cpu"``, ``"cuda"``).
    dtype: the dtype the op computes in (its main input's, or the autocast dtype for the matmul ops);
        ``None`` when the caller does not say.
    head_dim: the attention ops' head dim ``Dh``.
    k_norm: whether ``cls_scores`` has a key norm (then every key must be projected).
    queries: ``query_attention``'s query count ``Tq``.
    """
    device: str
    dtype: Optional[str] = None
    head_dim: Optional[int] = None
    k_norm: bool = False
    queries: Optional[int] = None


@dataclass(frozen=True)
class Supports:
    """What one backend's implementation of one op runs.

    devices: device types it runs on, ``ANY_DEVICE`` (``None``) for any (a backend's ``device_refusal`` says
        whether it can right now).
    dtypes: the dtypes it computes in.
    max_head_dim: the largest ``head_dim`` it takes (``None``: any).
    k_norm: whether it scores blocks that have a key norm.
    max_queries: the most queries it takes (``None``: any).
    how: one line on how it works, for the documentation's table.
    vendor: the vendor library it runs on a GPU (``"cuBLAS through F.linear"``), ``""`` for none; on CUDA
        tensors ``auto`` prefers a vendor path until a measurement says otherwise
        (:mod:`alast_kernels.backends.measured`).
    """
    devices: Optional[Tuple[str, ...]]
    dtypes: Tuple[str, ...] = GPU_DTYPES
    max_head_dim: Optional[int] = None
    k_norm: bool = True
    max_queries: Optional[int] = None
    how: str = ""
    vendor: str = ""

    def refusals(self, call: Call) -> List[str]:
        """Why this implementation cannot run ``call`` (empty when it can)."""
        if self.devices is not None and call.device not in self.devices:
            return [f"runs on {' and '.join(self.devices)} tensors, not {call.device}"]
        reasons = []
        if call.dtype is not None and call.dtype not in self.dtypes:
            reasons.append(f"{call.dtype} is not one of {', '.join(self.dtypes)}")
        if call.head_dim is not None and self.max_head_dim is not None and call.head_dim > self.max_head_dim:
            reasons.append(f"head dim {call.head_dim} > {self.max_head_dim}")
        if call.k_norm and not self.k_norm:
            reasons.append("no k_norm scoring (the keys must be projected)")
        if call.queries is not None and self.max_queries is not None and call.queries > self.max_queries:
            reasons.append(f"{call.queries} queries > {self.max_queries}")
        return reasons

    def describe(self) -> str:
        """The limits in a few words: ``"float32, float16, bfloat16; head dim ≤ 128"``."""
        parts = ["any float dtype" if set(self.dtypes) == set(FLOAT_DTYPES) else ", ".join(self.dtypes)]
        if self.max_head_dim is not None:
            parts.append(f"head dim ≤ {self.max_head_dim}")
        if not self.k_norm:
            parts.append("no `k_norm`")
        if self.max_queries is not None:
            parts.append(f"≤ {self.max_queries} queries")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------ declarations
# Declaring module -> op -> (implementation, its fields that differ from the backend's DEFAULT_SUPPORT).
_DECLARED: Dict[str, Dict[str, Tuple[Callable, dict]]] = {}
_FIELDS = frozenset(f.name for f in fields(Supports))


def implements(**differences) -> Callable[[Callable], Callable]:
    """Declare the function below as its backend's implementation of the op it is named after.

    differences: the :class:`Supports` fields in which it differs from its backend's ``DEFAULT_SUPPORT``
    (``how`` at least). The declaration belongs to the module that states it, so a function another
    backend declared can be declared again for this one: ``implements(how=...)(reference.masked_linear)``.
    Returns the function unchanged.
    """
    unknown = sorted(set(differences) - _FIELDS)
    if unknown:
        raise TypeError(f"implements({', '.join(unknown)}): expected fields of Supports")
    if not isinstance(differences.get("how"), str) or not differences["how"]:
        raise TypeError("implements(how): expected one line on how the implementation works")
    # The declaring module is the caller's, found as collections.namedtuple finds its caller's module.
    module = sys._getframe(1).f_globals["__name__"]

    def declare(fn: Callable) -> Callable:
        # Keyed by name, so a module imported again after a failed import declares afresh.
        _DECLARED.setdefault(module, {})[fn.__name__] = (fn, differences)
        return fn
    return declare


def collect(package: str, default: Supports) -> Tuple[Dict[str, Callable], Dict[str, Supports]]:
    """A backend's ``OPS`` and ``SUPPORTS``: what the modules of backend package ``package`` (each imported
    here) declare with :func:`implements`, every declaration ``default`` with its differences. In the order
    of :data:`alast_kernels.ops.__all__`, ops it does not list after them by name; ``ValueError`` for an op
    two modules of the package declare."""
    from .. import ops  # the contracts' order; imported here, as the ops import the dispatcher that loads us

    for info in pkgutil.iter_modules(sys.modules[package].__path__):
        importlib.import_module(f"{package}.{info.name}")
    found: Dict[str, Tuple[str, Callable, dict]] = {}
    for module in sorted(name for name in _DECLARED if name.startswith(f"{package}.")):
        for op, (fn, differences) in _DECLARED[module].items():
            if op in found:
                raise ValueError(f"{package}: {op} is declared in both {found[op][0]} and {module}")
            found[op] = (module, fn, differences)
    contract = list(ops.__all__)
    order = sorted(found, key=lambda op: (contract.index(op) if op in contract else len(contract), op))
    return ({op: found[op][1] for op in order},
            {op: replace(default, **found[op][2]) for op in order})
