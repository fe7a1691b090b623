"""A fixture the benchmarks share (imported by name: a `benchmarks/conftest.py` would shadow `tests/conftest.py`)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread_for_the_smoke(benchmark):
    """`make test`'s smoke runs on one thread: on a busy 2-core machine two threads spin against the other
    processes and run 20x slower. Measurements (`make bench`) keep every thread."""
    threads = torch.get_num_threads()
    if benchmark.disabled:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
