"""The ``auto`` order on CUDA tensors: from measurements where they exist, else a vendor-first default.

This module is the one place that order is defined (:data:`VENDOR_FIRST`, :data:`KERNELS_FIRST`).

No kernel is trusted on a GPU until it was measured there. ``gpu_dispatch.json`` beside this module (written
by ``make gpu-check`` from its op benchmarks, then committed) holds, per GPU family — the compute capability,
``"9.0"`` for H100 and H200 — and per op, the backends it timed, fastest first, with the times. Without a
record for the present GPU's family:

* ops a vendor library already runs (those whose reference implementation declares its ``vendor``:
  attention through PyTorch's SDPA, the linear layers through cuBLAS) take :data:`VENDOR_FIRST`, whose
  first backend, the reference, is that vendor path;
* ops no vendor library has (selection, gather, scatter, gather + LayerNorm, scores, fuse) take the
  project's kernels first: :data:`KERNELS_FIRST`.

A record's order comes first, then the rest of :data:`KERNELS_FIRST`, so a call the measured winner
declines (float64, a head dim it does not take) still finds a backend. A forced backend is not affected:
:func:`alast_kernels.backend.candidates` puts it first regardless.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from . import BACKENDS

TABLE_PATH = Path(__file__).resolve().with_name("gpu_dispatch.json")
KERNELS_FIRST: Tuple[str, ...] = ("cuda", "triton", "reference")
VENDOR_FIRST: Tuple[str, ...] = ("reference", "cuda", "triton")
DEFAULT_ORDER = (f"unmeasured: the vendor path ({VENDOR_FIRST[0]}) where one exists, else "
                 f"{', then '.join(KERNELS_FIRST)}")


def vendor_paths() -> Dict[str, str]:
    """``{op: vendor library}`` for the ops whose reference implementation runs a vendor library on a GPU,
    as the reference backend declares them."""
    from . import reference  # pure PyTorch, always importable; imported on first use like every backend
    return {op: support.vendor for op, support in reference.SUPPORTS.items() if support.vendor}


def capability_family(capability: Tuple[int, int]) -> str:
    """``(9, 0)`` -> ``"9.0"``: the key of a GPU family in the table."""
    major, minor = capability
    return f"{int(major)}.{int(minor)}"


@functools.lru_cache(maxsize=None)
def _device_family(index: int) -> str:
    return capability_family(torch.cuda.get_device_capability(index))


def current_family() -> Optional[str]:
    """The compute capability of the current CUDA device (``"9.0"``), ``None`` without one."""
    if not torch.cuda.is_available():
        return None
    return _device_family(torch.cuda.current_device())


def validate(table: object, source: str) -> dict:
    """``table`` checked against the format ``make gpu-check`` writes; raises ``ValueError`` naming
    ``source`` and the field otherwise. Returns it unchanged."""
    def fail(where: str, expected: str):
        raise ValueError(f"{source}: {where}: expected {expected}")

    if not isinstance(table, dict) or not isinstance(table.get("records"), dict):
        fail("top level", 'an object with a "records" object')
    for family, ops in table["records"].items():
        if not isinstance(ops, dict):
            fail(f"records[{family!r}]", "an object of op records")
        for op, record in ops.items():
            where = f"records[{family!r}][{op!r}]"
            order = record.get("order") if isinstance(record, dict) else None
            if (not isinstance(order, list) or not order or "reference" not in order
                    or any(name not in BACKENDS for name in order) or len(set(order)) != len(order)):
                fail(f"{where}.order", f"a list of distinct backends of {BACKENDS} including 'reference'")
            if not isinstance(record.get("geomean_us"), dict) or set(record["geomean_us"]) != set(order):
                fail(f"{where}.geomean_us", "one time per backend of its order")
    return table


@functools.lru_cache(maxsize=None)
def _table_at(path: str) -> dict:
    if not Path(path).exists():
        return {"records": {}}
    with open(path) as f:
        return validate(json.load(f), path)


def table() -> dict:
    """The committed table, read once per process (every CUDA dispatch asks); ``{"records": {}}`` when the
    file is absent."""
    return _table_at(str(TABLE_PATH))


def record(op: str, family: Optional[str]) -> Optional[dict]:
    """The measurement of ``op`` on GPU family ``family``, ``None`` when there is none."""
    if family is None:
        return None
    return table()["records"].get(family, {}).get(op)


def cuda_order(op: str, family: Optional[str]) -> Tuple[Tuple[str, ...], str]:
    """``auto``'s order for ``op`` on CUDA tensors of GPU family ``family`` and why, in a few words."""
    found = record(op, family)
    if found is not None:
        order = tuple(found["order"]) + tuple(name for name in KERNELS_FIRST if name not in found["order"])
        times = ", ".join(f"{name} {found['geomean_us'][name]:.1f} us" for name in found["order"])
        return order, (f"measured on {found.get('device', 'a GPU')} (compute capability {family}, "
                       f"{found.get('date', 'undated')}): {times}")
    where = "no GPU here" if family is None else f"no measurement for compute capability {family}"
    vendor = vendor_paths().get(op)
    if vendor:
        return VENDOR_FIRST, f"{where}: the vendor path first ({vendor})"
    return KERNELS_FIRST, f"{where}: no vendor library has this op, the project's kernels first"
