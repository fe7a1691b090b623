"""Backends implementing the op contracts of :mod:`alast_kernels.ops` (see :mod:`alast_kernels.backend`)."""
