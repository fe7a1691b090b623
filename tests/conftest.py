"""Shared test set-up (TRITON_INTERPRET is set in the root conftest.py)."""
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
    """Tests use tiny tensors: one thread is faster than two, and far faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_backend():
    """Every op on the reference backend for the test; the previous choice restored after."""
    old = backend._selected
    backend.set_backend("reference")
    yield
    backend._selected = old
