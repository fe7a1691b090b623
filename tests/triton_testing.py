"""Shared helpers for the triton backend tests (``test_triton_*.py``).

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` without a GPU, before this module imports the backend,
so the kernels run on CPU tensors through the Triton interpreter.
"""
from __future__ import annotations

import pytest
import torch

import alast_kernels
from alast_kernels import backend
from alast_kernels.backends import triton as triton_backend
from alast_kernels.backends.reference import OPS as REFERENCE_OPS  # noqa: F401 (re-exported)
from alast_kernels.backends.triton import _common
from tolerance import assert_flash_rule, max_error  # noqa: F401 (re-exported for the triton tests)

TRITON_OPS = triton_backend.OPS
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Same rule as conftest's `requires_gpu`, defined here so test modules need not import conftest by name.
requires_gpu = pytest.mark.gpu
# The interpreter's bfloat16 and TF32 dots differ from a GPU's (docs/testing.md): bfloat16 is GPU-only.
DTYPES = (torch.float32, torch.float16)


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every buffer a launcher allocates starts as NaN (floats) or -7 (integers): unwritten elements show."""
    real = _common.new_output

    def poisoned(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)

    monkeypatch.setattr(_common, "new_output", poisoned)


@pytest.fixture
def triton_forced(monkeypatch):
    """The public ops run the triton backend for the test's duration, and every fallback warns afresh
    (the dispatcher warns once per op and reason in a process)."""
    monkeypatch.setattr(backend, "_warned", set())
    alast_kernels.set_backend("triton")
    try:
        yield
    finally:
        alast_kernels.set_backend("auto")


def grads(outputs, inputs, grad_outputs):
    """Gradients of ``inputs`` (``None`` for unused ones) for the given output gradients."""
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
