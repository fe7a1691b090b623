"""``measure.median_seconds``: interleaved rounds, medians, and CUDA synchronisation around every timing."""
import pytest
import torch

from alast_kernels import measure


@pytest.fixture
def clock(monkeypatch):
    """A fake ``time.perf_counter`` that each timed call advances by its own duration; a log of events."""
    state = {"now": 0.0, "log": []}
    monkeypatch.setattr(measure.time, "perf_counter", lambda: state["now"])
    return state


def _call(clock, name, seconds):
    def fn():
        clock["log"].append(name)
        clock["now"] += seconds.pop(0)
    return fn


def test_interleaves_variants_skips_warmup_and_takes_medians(clock):
    a = _call(clock, "a", [100.0, 3.0, 1.0, 2.0])  # first call is the warm-up
    b = _call(clock, "b", [100.0, 5.0, 6.0, 4.0])
    assert measure.median_seconds([a, b], repeats=3, warmup=1) == [2.0, 5.0]
    assert clock["log"] == ["a", "b"] * 4


def test_inner_calls_are_timed_together_and_divided(clock):
    a = _call(clock, "a", [1.0, 2.0, 3.0, 6.0])
    assert measure.median_seconds([a], repeats=2, warmup=0, inner=2) == [4.5]  # (1+2)/2, (3+6)/2 -> 4.5


def test_every_timing_is_between_two_cuda_synchronisations(clock, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: clock["log"].append("sync"))
    reads = []
    monkeypatch.setattr(measure.time, "perf_counter", lambda: reads.append(len(clock["log"])) or clock["now"])
    a = _call(clock, "a", [1.0] * 4)
    measure.median_seconds([a], repeats=2, warmup=0, inner=2)
    assert clock["log"] == ["sync", "a", "a", "sync"] * 2
    # The clock is read after the first synchronisation and after the second, never between a call and its sync.
    assert reads == [1, 4, 5, 8]


def test_no_synchronisation_without_cuda(clock, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("synchronised without CUDA"))
    measure.median_seconds([_call(clock, "a", [1.0, 1.0])], repeats=1, warmup=1)
