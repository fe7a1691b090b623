"""Backends implementing the op contracts of :mod:`alast_kernels.ops` (see :mod:`alast_kernels.backend`)."""
from typing import Tuple

# Every backend, each a package of this one. Which of them `auto` tries, in which order: `measured`.
BACKENDS: Tuple[str, ...] = ("reference", "triton", "cuda")
