"""Set-up shared by tests/ and benchmarks/.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before Triton
reads it, so it is set here, before anything imports triton (importing torch or alast_kernels may). The
CUDA kernels run under the CUDA emulation (built on first use, see alast_kernels/_cuda_emulation.py): the
process must choose it before the first cuda op loads a library, so it is chosen here too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("ALAST_CUDA_EMULATION", "1")

import pytest  # noqa: E402

from alast_kernels import _extension  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (``pytest -m gpu`` selects them) are skipped where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cuda():
    """The cuda backend module (emulated on the CPU without a GPU); skips where it cannot be loaded."""
    try:
        _extension.load()
    except ImportError as exc:
        pytest.skip(f"alast_kernels._C is not usable here: {exc}")
    from alast_kernels.backends import cuda as backend
    return backend
