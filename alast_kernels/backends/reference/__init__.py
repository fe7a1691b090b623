"""The reference backend: pure PyTorch, any device and floating dtype. The oracle for the others.

One module per op family, each implementation declared beside its code (``@implements``,
:mod:`alast_kernels.backends.support`); :data:`OPS` and :data:`SUPPORTS` are collected from them.
Implementations take their arguments already checked by :mod:`alast_kernels.ops`.
"""
from typing import Optional

from ..support import ANY_DEVICE, FLOAT_DTYPES, Supports, collect

DEVICES_NOTE = "any device"
DEFAULT_SUPPORT = Supports(devices=ANY_DEVICE, dtypes=FLOAT_DTYPES)
OPS, SUPPORTS = collect(__name__, DEFAULT_SUPPORT)
globals().update(OPS)  # each implementation also by its op's name: `reference.select_tokens(...)`


def device_refusal(device_type: str) -> Optional[str]:
    """Runs wherever PyTorch does."""
    return None
