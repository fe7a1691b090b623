"""Backend choice: ``set_backend``/``get_backend``/``ALAST_BACKEND`` and the fallback of a forced backend."""
import types
import warnings

import pytest
import torch

from alast_kernels import backend, get_backend, ops, set_backend


OP_CALLS = {
    "select_tokens": lambda: ops.select_tokens(torch.rand(2, 9), 3),
    "gather_tokens": lambda: ops.gather_tokens(torch.randn(2, 9, 6), torch.tensor([[0, 4], [8, 1]])),
    "scatter_tokens": lambda: ops.scatter_tokens(torch.randn(2, 9, 6), torch.tensor([[0, 4], [8, 1]]),
                                                 torch.randn(2, 2, 6)),
    "gather_layer_norm": lambda: ops.gather_layer_norm(torch.randn(2, 9, 6), torch.tensor([[0, 4], [8, 1]]),
                                                       torch.ones(6), torch.zeros(6)),
    "attention": lambda: ops.attention(*(torch.randn(2, 3, 9, 4),) * 3, return_cls=True),
    "cls_scores": lambda: ops.cls_scores(torch.randn(2, 9, 6), None, None, torch.randn(18, 6), None, 2),
    "masked_linear": lambda: ops.masked_linear(torch.randn(2, 9, 6), torch.randn(5, 6), None, False),
    "masked_mlp": lambda: ops.masked_mlp(torch.randn(2, 9, 6), torch.randn(8, 6), None, torch.randn(6, 8), None,
                                         False),
}


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """No choice made, no environment variable, no warning issued yet; restored afterwards."""
    monkeypatch.setattr(backend, "_selected", None)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.delenv("ALAST_BACKEND", raising=False)


def test_default_is_auto():
    assert get_backend() == "auto"


def test_set_backend_and_get_backend():
    for name in ("reference", "triton", "cuda", "auto"):
        set_backend(name)
        assert get_backend() == name
    set_backend("REFERENCE")
    assert get_backend() == "reference"


@pytest.mark.parametrize("bad", ["fast", "", "torch", None, 1])
def test_set_backend_rejects_unknown_names(bad):
    set_backend("reference")
    with pytest.raises(ValueError, match="name"):
        set_backend(bad)
    assert get_backend() == "reference"  # the failed call changed nothing


def test_environment_variable_and_its_override(monkeypatch):
    monkeypatch.setenv("ALAST_BACKEND", "Reference")
    assert get_backend() == "reference"
    monkeypatch.setenv("ALAST_BACKEND", "cuda")
    assert get_backend() == "cuda"  # read at each call, not cached at import
    set_backend("auto")
    assert get_backend() == "auto"  # set_backend wins over the environment


def test_bad_environment_variable_raises_naming_it(monkeypatch):
    monkeypatch.setenv("ALAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ALAST_BACKEND"):
        get_backend()
    with pytest.raises(ValueError, match="ALAST_BACKEND"):
        ops.select_tokens(torch.rand(2, 5), 2)


def test_auto_on_cpu_runs_the_reference_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in OP_CALLS.values():
            call()


@pytest.mark.parametrize("via_env", [False, True])
def test_forced_unavailable_backend_falls_back_with_one_warning_per_op(monkeypatch, via_env):
    # The CUDA backend cannot run CPU tensors (whether or not the extension is built).
    if via_env:
        monkeypatch.setenv("ALAST_BACKEND", "cuda")
    else:
        set_backend("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for call in OP_CALLS.values():
                call()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == len(OP_CALLS), messages
    for op in OP_CALLS:
        mine = [m for m in messages if f" {op} " in m]
        assert len(mine) == 1 and "reference" in mine[0] and "cuda" in mine[0], messages


def test_forced_fallback_computes_the_reference_result():
    torch.manual_seed(0)
    x, idx, delta = torch.randn(2, 9, 6), torch.tensor([[0, 4], [8, 1]]), torch.randn(2, 2, 6)
    want = ops.scatter_tokens(x, idx, delta)
    set_backend("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ops.scatter_tokens(x, idx, delta)
    assert torch.equal(got, want)


def test_forced_backend_missing_one_op_uses_it_where_it_can(monkeypatch):
    """A backend that runs on the device but lacks an op: its ops are used, the missing one falls back."""
    calls = []

    def fake_gather(x, idx):
        calls.append("gather")
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))

    fake = types.SimpleNamespace(OPS={"gather_tokens": fake_gather}, supports=lambda device: True)
    monkeypatch.setitem(backend._modules, "cuda", fake)
    set_backend("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.gather_tokens(torch.randn(2, 9, 6), torch.tensor([[0, 4], [8, 1]]))
        ops.select_tokens(torch.rand(2, 9), 3)
        ops.select_tokens(torch.rand(2, 9), 3)
    assert calls == ["gather"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "select_tokens" in messages[0] and "no 'select_tokens' kernel" in messages[0]


def test_no_backend_can_run_raises(monkeypatch):
    broken = types.SimpleNamespace(OPS={}, supports=lambda device: False)
    monkeypatch.setitem(backend._modules, "reference", broken)
    with pytest.raises(RuntimeError, match="select_tokens"):
        ops.select_tokens(torch.rand(2, 9), 3)
