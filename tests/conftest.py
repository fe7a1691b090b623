"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any
kernel is defined, so it is set here, before any test module imports the Triton backend.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
