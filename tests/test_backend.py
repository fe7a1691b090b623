"""Backend choice: ``set_backend``/``get_backend``/``ALAST_BACKEND``, dispatch from the backends' declared
capabilities with one warning per fallback, and the choice under ``torch.compile``."""
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch

import alast_kernels.backends
from alast_kernels import backend, get_backend, ops, set_backend
from alast_kernels.backends.support import FLOAT_DTYPES, Call, Supports

ROOT = Path(__file__).resolve().parents[1]

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


def _runtime_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _install(monkeypatch, name, module):
    """``module`` as backend ``name`` for the test (``None``: a backend whose import failed)."""
    monkeypatch.setattr(alast_kernels.backends, name, module, raising=False)


def fake_backend(ops_, supports=None, default=None, refuse_device=None):
    """A backend module: ``ops_`` and their declarations; ``refuse_device(device_type)`` -> reason or None."""
    return types.SimpleNamespace(
        OPS=ops_, SUPPORTS=supports or {}, DEFAULT_SUPPORT=default or Supports(devices=("cpu", "cuda")),
        device_refusal=refuse_device or (lambda device_type: None), DEVICES_NOTE="fake")


# ------------------------------------------------------------------------------------------ the choice
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


# ------------------------------------------------------------------------------------------ real backends
def test_auto_on_cpu_runs_the_reference_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for op, call in OP_CALLS.items():
            assert backend._choose(op, "cpu", "float32", (), "auto") == "reference"
            call()


@pytest.mark.parametrize("via_env", [False, True])
def test_forced_backend_that_cannot_run_falls_back_with_one_warning_per_op(monkeypatch, via_env):
    # Without the interpreter the triton backend cannot run CPU tensors (its declarations say so).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if via_env:
        monkeypatch.setenv("ALAST_BACKEND", "triton")
    else:
        set_backend("triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for call in OP_CALLS.values():
                call()
    messages = _runtime_warnings(caught)
    assert len(messages) == len(OP_CALLS), messages
    for op in OP_CALLS:
        (mine,) = [m for m in messages if f" {op} " in m]
        assert "falls back to the reference backend" in mine and "triton:" in mine and "TRITON_INTERPRET" in mine


def test_forced_fallback_computes_the_reference_result(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    x, idx, delta = torch.randn(2, 9, 6), torch.tensor([[0, 4], [8, 1]]), torch.randn(2, 2, 6)
    want = ops.scatter_tokens(x, idx, delta)
    set_backend("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ops.scatter_tokens(x, idx, delta)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_kernel_backends_refuse_float64_and_the_reference_takes_it(name):
    module = backend.load(name)
    if module is None:
        pytest.skip(f"backend {name} not loadable here: {backend.import_error(name)}")
    for op, support in module.SUPPORTS.items():
        if op == "masked_linear":  # the triton backend's is the reference's own
            assert support.dtypes == FLOAT_DTYPES
            continue
        assert "float64 is not one of" in backend.refusal(name, op, Call("cuda", "float64")), op
    assert backend.refusal("reference", "gather_tokens", Call("cuda", "float64")) is None


# ------------------------------------------------------------------------------------------ declarations
def test_declarations_decide_per_call_and_each_fallback_warns_once(monkeypatch):
    calls = []

    def fast_gather(x, idx):
        calls.append(x.dtype)
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))

    fast = fake_backend({"gather_tokens": fast_gather},
                        {"gather_tokens": Supports(devices=("cpu",), dtypes=("float32", "float16"))})
    _install(monkeypatch, "triton", fast)
    set_backend("triton")
    x, idx = torch.randn(2, 9, 6), torch.tensor([[0, 4], [8, 1]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.float64, torch.float16, torch.float64, torch.bfloat16):
            xd = x.to(dtype)
            assert torch.equal(ops.gather_tokens(xd, idx), torch.stack([xd[0, [0, 4]], xd[1, [8, 1]]]))
    assert calls == [torch.float32, torch.float16]
    messages = _runtime_warnings(caught)
    assert messages == [
        "alast_kernels: gather_tokens falls back to the reference backend (triton: float64 is not one of float32, "
        "float16)",
        "alast_kernels: gather_tokens falls back to the reference backend (triton: bfloat16 is not one of "
        "float32, float16)"]


@pytest.mark.parametrize("facts, declared, reason", [
    ({"head_dim": 80}, Supports(("cpu",), max_head_dim=64), "head dim 80 > 64"),
    ({"k_norm": True}, Supports(("cpu",), k_norm=False), "no k_norm scoring"),
    ({}, Supports(("cuda",)), "runs on cuda tensors, not cpu"),
])
def test_refusal_names_the_declared_limit(facts, declared, reason):
    module = fake_backend({"op": None}, {"op": declared})
    assert reason in "; ".join(declared.refusals(Call("cpu", "float32", **facts)))
    assert declared.refusals(Call("cpu" if "cpu" in declared.devices else "cuda", "float32")) == []
    assert module.SUPPORTS["op"] is declared


def test_an_op_without_a_declaration_runs_what_the_backend_declares_by_default(monkeypatch):
    module = fake_backend({"new_op": lambda x: x}, default=Supports(devices=("cpu",), dtypes=("float32",)))
    _install(monkeypatch, "triton", module)
    assert backend.refusal("triton", "new_op", Call("cpu", "float32")) is None
    assert backend.refusal("triton", "new_op", Call("cpu", "float16")) == "float16 is not one of float32"


def test_device_refusal_is_asked_only_for_declared_devices(monkeypatch):
    module = fake_backend({"gather_tokens": None},
                          refuse_device=lambda d: "not in this process" if d == "cpu" else None)
    _install(monkeypatch, "triton", module)
    assert backend.refusal("triton", "gather_tokens", Call("cpu", "float32")) == "not in this process"
    assert backend.refusal("triton", "gather_tokens", Call("cuda", "float32")) is None


def test_auto_on_cuda_tensors_follows_the_order_and_warns_only_when_it_ends_on_the_reference(monkeypatch):
    everywhere = Supports(devices=("cuda",))
    _install(monkeypatch, "cuda", fake_backend({"gather_tokens": None}, default=everywhere))
    _install(monkeypatch, "triton", fake_backend(
        {"gather_tokens": None, "gather_layer_norm": None}, default=replace_support(everywhere, max_head_dim=128)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend._choose("gather_tokens", "cuda", "float32", (), "auto") == "cuda"
        assert backend._choose("gather_layer_norm", "cuda", "float32", (("head_dim", 64),), "auto") == "triton"
        assert _runtime_warnings(caught) == []  # cuda has no gather_layer_norm kernel: not a fallback
        assert backend._choose("gather_layer_norm", "cuda", "float32", (("head_dim", 160),), "auto") == "reference"
        assert backend._choose("gather_layer_norm", "cuda", "float32", (("head_dim", 160),), "auto") == "reference"
    assert _runtime_warnings(caught) == [
        "alast_kernels: gather_layer_norm falls back to the reference backend (cuda: has no gather_layer_norm "
        "kernel; triton: head dim 160 > 128)"]


def replace_support(support, **changes):
    from dataclasses import replace
    return replace(support, **changes)


def test_no_backend_can_run_raises_with_every_reason(monkeypatch):
    broken = fake_backend({}, refuse_device=lambda d: None)
    _install(monkeypatch, "reference", broken)
    with pytest.raises(RuntimeError, match=r"no backend can run select_tokens on cpu \(reference: has no "
                                           r"select_tokens kernel\)"):
        ops.select_tokens(torch.rand(2, 9), 3)


def test_a_backend_that_fails_to_import_is_skipped_with_its_reason(monkeypatch):
    _install(monkeypatch, "triton", None)
    monkeypatch.setitem(backend._import_errors, "triton", "ImportError: no module named triton")
    set_backend("triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops.select_tokens(torch.rand(2, 9), 3)
    (message,) = _runtime_warnings(caught)
    assert "triton: could not be loaded (ImportError: no module named triton)" in message


# ----------------------------------------------------------------------------------- the docs' backend table
def test_docs_backend_table_is_generated_from_the_declarations():
    """docs/ops.md, "Which backend runs each op": regenerate with ``make backend-table`` when a declaration
    changes."""
    from alast_kernels import info
    assert info.readme_table((ROOT / "docs" / "ops.md").read_text()) == info.markdown_table()


def test_docs_contracts_are_the_ops_docstrings():
    """docs/ops.md lists every op of ``alast_kernels.ops.__all__`` with its docstring as its contract (one
    source): regenerate with ``make backend-table`` when a contract changes."""
    from alast_kernels import info
    table = info.contracts((ROOT / "docs" / "ops.md").read_text())
    assert table == info.contract_table()
    assert [row.split("`")[1].split("(")[0] for row in table.splitlines()[2:]] == ops.__all__


def test_info_prints_build_availability_with_reasons_and_the_table():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "alast_kernels.info"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("alast_kernels ") and f"torch {torch.__version__}" in out
    triton_lines = out.split("  triton ", 1)[1].splitlines()[:3]
    assert "cpu tensors here: no (CPU tensors run only under the Triton interpreter" in "\n".join(triton_lines)
    assert "| `select_tokens` |" in out and "| op | reference | triton | cuda |" in out
    from alast_kernels import methods
    listed = out.split("methods (", 1)[1].split("declared capabilities", 1)[0]
    for name in methods.available():
        assert f"\n  {name} " in listed and "options: " in listed, name


def test_capability_table_follows_the_declarations(monkeypatch):
    from dataclasses import replace

    from alast_kernels import info
    modules = {name: backend.load(name) for name in backend.BACKENDS}
    triton = modules["triton"]
    narrower = dict(triton.SUPPORTS, fuse_tokens=replace(triton.SUPPORTS["fuse_tokens"], max_head_dim=96))
    monkeypatch.setattr(triton, "SUPPORTS", narrower)
    row = next(line for line in info.markdown_table(modules).splitlines() if line.startswith("| `fuse_tokens`"))
    assert "(head dim ≤ 96)" in row and row.endswith("| triton (reference for float64; reference for head dim > 96) |")


# ------------------------------------------------------------------------------------------ a new op
TOY_CONTRACT = """

def toy_double(x: torch.Tensor) -> torch.Tensor:
    \"\"\"``2 · x``, any shape (a test's toy op).\"\"\"
    _checks.tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    return _backend.implementation("toy_double", x.device, x.dtype)(x)
"""
TOY_REFERENCE = """
from ..support import implements


@implements(how="the toy's reference")
def toy_double(x):
    return x + x
"""
TOY_KERNEL = """
from ..support import implements

CALLS = []


@implements(dtypes=("float32",), how="the toy's kernel")
def toy_double(x):
    CALLS.append(x.dtype)
    return 2 * x
"""
TOY_SCRIPT = """
import warnings
import torch
import alast_kernels
from alast_kernels import backend, info, ops, set_backend
from alast_kernels.backends import triton
assert alast_kernels.__file__.startswith({root!r}), alast_kernels.__file__
x = torch.randn(2, 3)
assert torch.equal(ops.toy_double(x), 2 * x)  # auto on CPU tensors: the reference
set_backend("triton")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert torch.equal(ops.toy_double(x), 2 * x) and torch.equal(ops.toy_double(x.double()), 2 * x.double())
assert triton.toy.CALLS == [torch.float32]
print("\\n".join(str(w.message) for w in caught))
print("\\n".join(info.auto_lines({{name: backend.load(name) for name in backend.BACKENDS}})))
print(info.markdown_table(), end="")
"""


def _mirror(source: Path, target: Path) -> None:
    """``target``: ``source``'s directories, each file a symbolic link to the original (a file written in
    ``target`` replaces its link only)."""
    for path in source.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        there = target / path.relative_to(source)
        if path.is_dir():
            there.mkdir(parents=True, exist_ok=True)
        else:
            there.parent.mkdir(parents=True, exist_ok=True)
            there.symlink_to(path)


def test_a_new_op_needs_no_registration_beyond_its_declared_implementations(tmp_path):
    """docs/backends.md, "Adding a Triton op": in a copy of the package that differs by the op's contract (in
    ``ops``), a reference module and a kernel module, each implementation declared beside its code, the op
    runs, the dispatcher picks the kernel where its declaration allows and says why not elsewhere, and
    ``info`` lists it — no table or list of ops was edited."""
    package = tmp_path / "alast_kernels"
    _mirror(ROOT / "alast_kernels", package)
    contract = package / "ops" / "__init__.py"
    text = contract.read_text()
    contract.unlink()
    contract.write_text(text + TOY_CONTRACT)
    (package / "backends" / "reference" / "toy.py").write_text(TOY_REFERENCE)
    (package / "backends" / "triton" / "toy.py").write_text(TOY_KERNEL)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ALAST_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", TOY_SCRIPT.format(root=str(package))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert ("alast_kernels: toy_double falls back to the reference backend (triton: float64 is not one of "
            "float32)") in out
    assert "  toy_double         reference  no GPU here: no vendor library has this op, the project's kernels first" \
        in out
    assert "| `toy_double` | the toy's reference | the toy's kernel (float32) | — | reference |" in out


# ------------------------------------------------------------------------------------------ torch.compile
COMPILE_SCRIPT = """
import warnings
import torch
from timm.models.vision_transformer import VisionTransformer
import alast_kernels
from alast_kernels import BlockPlan

warnings.simplefilter("ignore", RuntimeWarning)  # the ops the cuda backend lacks fall back, as they should
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3, mlp_ratio=2.0,
                          num_classes=0)
block = alast_kernels.convert(model).blocks[0].to(device).train()
x = torch.randn(2, 17, 48, device=device)
compiled = torch.compile(block, fullgraph=True)  # nothing ran eagerly: the choice happens while tracing
block.alast_plan = BlockPlan(keep_ratio=0.5, train=True, num_patches=16)
got = compiled(x)
import alast_kernels.backends as loaded
assert [n for n in ("reference", "triton", "cuda") if hasattr(loaded, n)] == ["reference", "cuda"]
block.alast_plan = BlockPlan(keep_ratio=0.5, train=True, num_patches=16)
want = torch.compiler.disable(block)(x)
torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("compiled block ok", block.alast_keep)
"""


def test_forced_cuda_backend_compiles_with_fullgraph_from_a_cold_start(cuda):
    """The choice (the import of the cuda backend and the load of its library included) runs eagerly while
    torch.compile traces a planned block in a process where nothing ran before, so fullgraph=True holds with
    the cuda kernels (emulated without a GPU) inside the graph; the result equals the eager block's.
    (tests/test_compile.py covers the same cold start on the default backend.)"""
    env = {**os.environ, "ALAST_BACKEND": "cuda", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE_SCRIPT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled block ok 8" in done.stdout, done.stderr[-4000:]
