"""What an implementation runs: the declarations every backend makes per op, and the facts of a call they
are checked against.

Every backend module (``alast_kernels/backends/<name>/__init__.py``) defines

``OPS``              ``{op: callable}``: its implementations, taking the op's arguments already checked by
                     :mod:`alast_kernels.ops`;
``SUPPORTS``         ``{op: Supports}``: what each implementation runs; an op of ``OPS`` without an entry runs
                     what ``DEFAULT_SUPPORT`` says;
``DEFAULT_SUPPORT``  the backend's usual :class:`Supports`;
``device_refusal``   ``device_refusal(device_type) -> str | None``: why the backend cannot run on that kind of
                     device in this process (``None`` when it can), e.g. CPU tensors without the Triton
                     interpreter.

:mod:`alast_kernels.backend` picks, per call, the first backend in its order that has the op, runs on the
device and whose declaration accepts the :class:`Call`; nothing inside a backend falls back by itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

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
    """
    devices: Optional[Tuple[str, ...]]
    dtypes: Tuple[str, ...] = GPU_DTYPES
    max_head_dim: Optional[int] = None
    k_norm: bool = True
    max_queries: Optional[int] = None
    how: str = ""

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
