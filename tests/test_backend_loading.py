"""Loading a backend: an absent one (not installed, not built) is skipped with its reason; any other failure
while importing it is a bug and propagates with its traceback, under ``auto`` and forced alike."""
import sys
import warnings

import pytest

import alast_kernels.backends
import alast_kernels.backends.support as support
from alast_kernels import backend
from alast_kernels.backends.support import Call

CALL = Call("cuda", "float32")


@pytest.fixture
def fresh_triton(monkeypatch):
    """The triton backend not imported yet (whatever earlier tests did); every module its failed imports
    leave behind is removed afterwards, and the loaded state is restored."""
    monkeypatch.setattr(backend, "_import_errors", {})
    monkeypatch.setattr(backend, "_selected", None)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.delattr(alast_kernels.backends, "triton", raising=False)
    prefix = "alast_kernels.backends.triton"
    before = {k: v for k, v in sys.modules.items() if k == prefix or k.startswith(prefix + ".")}
    for key in before:
        monkeypatch.delitem(sys.modules, key)
    yield
    for key in [k for k in sys.modules if k == prefix or k.startswith(prefix + ".")]:
        if key not in before:
            del sys.modules[key]


def test_absent_dependency_is_skipped_with_its_reason(fresh_triton, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ModuleNotFoundError('triton')
    assert backend.load("triton") is None
    reason = backend.refusal("triton", "gather_tokens", CALL)
    assert reason.startswith("could not be loaded (ModuleNotFoundError") and "triton" in reason
    assert backend.import_error("triton") is not None
    # Under auto the next backend runs, with the reason in the one fallback warning.
    monkeypatch.setattr(backend, "candidates", lambda op, device, choice: ("triton", "reference"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend._choose("gather_tokens", "cuda", "float32", (), "auto") == "reference"
        assert backend._choose("gather_tokens", "cuda", "float32", (), "auto") == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "triton: could not be loaded (ModuleNotFoundError" in messages[0]


def _planted(exc: Exception):
    def supports(*args, **kwargs):
        raise exc
    return supports


@pytest.mark.parametrize("exc", [AttributeError("planted bug"), RuntimeError("planted bug")],
                         ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("choice", ["auto", "triton"])
def test_a_bug_in_a_backend_propagates_with_its_traceback(fresh_triton, monkeypatch, exc, choice):
    # The triton backend's __init__ builds its declarations with Supports(...): make that raise.
    monkeypatch.setattr(support, "Supports", _planted(exc))
    monkeypatch.setattr(backend, "candidates", lambda op, device, choice: ("triton", "reference"))
    for _ in range(2):  # not remembered as "unavailable": the next call raises again
        with pytest.raises(type(exc), match="planted bug") as info:
            backend._choose("gather_tokens", "cuda", "float32", (), choice)
        assert any(entry.name == "supports" for entry in info.traceback)  # the backend's own frame
    assert backend.import_error("triton") is None


def test_an_import_error_inside_this_package_is_a_bug_not_an_absence(fresh_triton, monkeypatch):
    # A missing module of our own (a renamed file, a typo in an import) must not read as "triton is absent".
    monkeypatch.setitem(sys.modules, "alast_kernels.backends.triton.fuse", None)
    with pytest.raises(ImportError, match="alast_kernels.backends.triton.fuse"):
        backend.refusal("triton", "gather_tokens", CALL)
    assert backend.import_error("triton") is None


def test_absent_classification():
    assert backend._absent(ModuleNotFoundError("No module named 'triton'", name="triton"))
    assert backend._absent(ImportError("alast_kernels was installed without its CUDA extension"))
    assert not backend._absent(ImportError("cannot import name 'x'", name="alast_kernels.backends.support"))
    assert not backend._absent(ModuleNotFoundError("no module", name="alast_kernels"))
