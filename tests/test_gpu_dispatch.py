"""``auto`` on CUDA tensors: the measured table (``alast_kernels/backends/gpu_dispatch.json``) or, for an op
without a record for the present GPU family, the vendor path where one exists and the project's kernels
elsewhere; ``python -m alast_kernels.info`` says which and why. No GPU here: the GPU family is simulated."""
import json
import warnings

import pytest
import torch

import alast_kernels.backends
from alast_kernels import backend, info, set_backend
from alast_kernels.backends import measured
from alast_kernels.backends.support import Supports

H200 = "9.0"
KERNEL_OPS = ("select_tokens", "gather_tokens", "scatter_tokens", "gather_layer_norm", "cls_scores", "fuse_tokens")
VENDOR_OPS = ("attention", "query_attention", "masked_linear", "masked_mlp")


def _record(order, times, device="NVIDIA H200"):
    return {"device": device, "date": "2026-12-02", "order": order, "geomean_us": dict(zip(order, times)),
            "kernel_beats_reference": order[0] != "reference"}


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.setattr(backend, "_selected", None)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.delenv("ALAST_BACKEND", raising=False)


@pytest.fixture
def gpu(monkeypatch):
    """A simulated H200 (compute capability 9.0), fake kernel backends that take every op on CUDA tensors,
    and an empty table; returns a function that installs records ``{family: {op: record}}``."""
    monkeypatch.setattr(measured, "current_family", lambda: H200)
    everything = Supports(devices=("cuda",))
    ops_ = {op: None for op in KERNEL_OPS + VENDOR_OPS}
    for name in ("triton", "cuda"):
        fake = type("FakeBackend", (), {"OPS": ops_, "SUPPORTS": {}, "DEFAULT_SUPPORT": everything,
                                        "DEVICES_NOTE": "fake", "device_refusal": staticmethod(lambda d: None)})
        monkeypatch.setattr(alast_kernels.backends, name, fake, raising=False)
    records = {}
    monkeypatch.setattr(measured, "table", lambda: {"records": records})
    return records.update


def _auto(op, dtype="bfloat16"):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # none of these choices is a fallback
        return backend._choose(op, "cuda", dtype, (), "auto")


@pytest.mark.parametrize("op", VENDOR_OPS)
def test_without_a_record_ops_with_a_vendor_path_take_it(gpu, op):
    assert _auto(op) == "reference"


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_without_a_record_ops_without_a_vendor_path_take_the_kernels(gpu, op):
    assert _auto(op) == "cuda"


def test_a_record_where_the_kernel_won_puts_it_first(gpu):
    gpu({H200: {"attention": _record(["triton", "reference"], [80.0, 100.0])}})
    assert _auto("attention") == "triton"
    assert _auto("query_attention") == "reference"  # no record: still the vendor default


def test_a_record_where_the_kernel_lost_puts_the_reference_first(gpu):
    gpu({H200: {"select_tokens": _record(["reference", "triton", "cuda"], [20.0, 30.0, 40.0])}})
    assert _auto("select_tokens") == "reference"
    assert _auto("gather_tokens") == "cuda"


def test_a_record_of_another_gpu_family_is_not_used(gpu):
    gpu({"8.0": {"attention": _record(["triton", "reference"], [80.0, 100.0]),
                 "select_tokens": _record(["reference", "cuda"], [20.0, 40.0])}})
    assert _auto("attention") == "reference" and _auto("select_tokens") == "cuda"


def test_the_rest_of_the_order_follows_a_record_so_declined_calls_still_run(gpu, monkeypatch):
    """Only cuda was measured faster; a call cuda declines (float64 here) goes on to triton, then reference."""
    gpu({H200: {"gather_tokens": _record(["cuda", "reference"], [10.0, 30.0])}})
    order, why = measured.cuda_order("gather_tokens", H200)
    assert order == ("cuda", "reference", "triton")
    assert why == "measured on NVIDIA H200 (compute capability 9.0, 2026-12-02): cuda 10.0 us, reference 30.0 us"
    monkeypatch.setattr(alast_kernels.backends.cuda, "DEFAULT_SUPPORT",
                        Supports(devices=("cuda",), dtypes=("bfloat16",)))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert backend._choose("gather_tokens", "cuda", "float32", (), "auto") == "reference"


@pytest.mark.parametrize("forced", ["triton", "cuda"])
def test_a_forced_backend_runs_what_it_is_told_whatever_the_record(gpu, forced):
    gpu({H200: {"attention": _record(["reference", "triton"], [50.0, 100.0]),
                "select_tokens": _record(["reference", "cuda", "triton"], [1.0, 2.0, 3.0])}})
    set_backend(forced)
    for op in ("attention", "select_tokens", "masked_mlp"):
        assert backend._choose(op, "cuda", "bfloat16", (), forced) == forced


def test_cpu_tensors_ignore_the_table(gpu):
    gpu({H200: {"select_tokens": _record(["triton", "reference"], [1.0, 2.0])}})
    assert backend.candidates("select_tokens", "cpu", "auto") == ("reference",)


def test_current_family_is_the_current_devices_compute_capability(monkeypatch):
    measured._device_family.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: {0: (8, 0), 1: (9, 0)}[index])
    try:
        assert measured.current_family() == "9.0"
    finally:
        measured._device_family.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert measured.current_family() is None


# ------------------------------------------------------------------------------------------ the table file
def test_the_committed_table_is_valid():
    table = json.loads(measured.TABLE_PATH.read_text())
    assert measured.validate(table, "committed") is table
    for family, ops in table["records"].items():
        assert set(ops) <= set(KERNEL_OPS + VENDOR_OPS), family


@pytest.mark.parametrize("bad, field", [
    ([], "top level"),
    ({"records": {"9.0": {"attention": {"order": ["triton"], "geomean_us": {"triton": 1.0}}}}}, "order"),
    ({"records": {"9.0": {"attention": {"order": ["flash", "reference"], "geomean_us": {}}}}}, "order"),
    ({"records": {"9.0": {"attention": {"order": ["triton", "reference"], "geomean_us": {"triton": 1.0}}}}},
     "geomean_us"),
])
def test_a_malformed_table_raises_naming_the_file_and_field(bad, field):
    with pytest.raises(ValueError, match=rf"gpu_dispatch\.json: .*{field}"):
        measured.validate(bad, "gpu_dispatch.json")


def test_a_malformed_table_file_fails_the_dispatch_loudly(tmp_path, monkeypatch):
    path = tmp_path / "gpu_dispatch.json"
    path.write_text(json.dumps({"records": {"9.0": {"attention": {"order": ["triton"]}}}}))
    monkeypatch.setattr(measured, "TABLE_PATH", path)
    monkeypatch.setattr(measured, "current_family", lambda: H200)
    with pytest.raises(ValueError, match=str(path)):
        backend.candidates("attention", "cuda", "auto")


# ------------------------------------------------------------------------------------------ info
def _modules():
    return {name: backend.load(name) for name in backend.BACKENDS}


def test_info_says_which_backend_auto_takes_and_why_without_a_gpu():
    lines = info.auto_lines(_modules(), None)
    assert lines[0].startswith("auto on CUDA tensors (no CUDA device visible")
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(KERNEL_OPS + VENDOR_OPS)
    assert rows["attention"].split()[1] == "reference" and "the vendor path first (PyTorch SDPA" in rows["attention"]
    assert rows["select_tokens"].split()[1] == "cuda" and "the project's kernels first" in rows["select_tokens"]
    assert rows["fuse_tokens"].split()[1] == "triton"  # no cuda kernel


def test_info_shows_a_measured_record_for_the_present_gpu(monkeypatch):
    records = {H200: {"attention": _record(["triton", "reference"], [80.0, 100.0])}}
    monkeypatch.setattr(measured, "table", lambda: {"records": records})
    rows = {line.split()[0]: line for line in info.auto_lines(_modules(), H200, "NVIDIA H200")[1:]}
    assert rows["attention"].split()[1] == "triton"
    assert "measured on NVIDIA H200 (compute capability 9.0" in rows["attention"]
    assert "no measurement for compute capability 9.0: the vendor path first" in rows["query_attention"]
    # without a GPU the record is named in the heading, not used
    no_gpu = info.auto_lines(_modules(), None)
    assert "the table has records for compute capability 9.0" in no_gpu[0]
    assert next(line for line in no_gpu if line.split()[0] == "attention").split()[1] == "reference"
