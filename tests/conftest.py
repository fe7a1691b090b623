"""Shared test set-up (TRITON_INTERPRET is set in the root conftest.py)."""
import os

import pytest
import torch

from alast_kernels import backend

# The `gpu` marker: `pytest -m gpu` selects these (make gpu-check); skipped without a CUDA device (conftest.py).
requires_gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _deterministic_matmul():
    """TF32 off so float32 comparisons against the reference are tight on a GPU."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tests use tiny tensors: one thread is faster than two, and far faster on a shared machine.

    ``ALAST_TEST_THREADS=N`` runs them on N threads instead: another reduction order inside PyTorch's CPU
    kernels, one of the arithmetic paths the tolerance tests are run on (docs/testing.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ALAST_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_backend():
    """Every op on the reference backend for the test; the previous choice restored after."""
    old = backend._selected
    backend.set_backend("reference")
    yield
    backend._selected = old


def pytest_collection_modifyitems(config, items):
    """Tests in modules that use the tolerance rule are marked ``tolerance``: `make test` also runs them on
    other arithmetic paths of PyTorch's CPU kernels (docs/testing.md, "Other arithmetic paths")."""
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "assert_flash_rule"):
            item.add_marker(pytest.mark.tolerance)
