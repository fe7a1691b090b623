"""The compiled extension ``alast_kernels._C`` on any machine, GPU or not.

Checks that it was built where a toolkit is present, that every op is registered with its schema, that
the fake kernels give the right shapes (so the ops trace under ``torch.compile``), that bad arguments fail
with ``TORCH_CHECK`` messages naming them, that a build/runtime mismatch or a failed load gives one warning
and a fallback, and (slow) that a wheel builds, is named for CUDA and torch, installs into a fresh virtual
environment and imports there. Running the kernels is ``test_cuda_ops.py`` (on a GPU, or emulated).

Without a GPU this process runs the CUDA emulation (root conftest), whose library is ``ops.cpp`` compiled
for CPU tensors: the schemas and argument checks tested in-process are that same source; the real ``_C``
(CUDA registration, the device check) is loaded in a child process without the emulation.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import types
import venv
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import alast_kernels
import alast_kernels.backends
from alast_kernels import _cuda_emulation, _extension
from alast_kernels import backend as _backend
from alast_kernels.backends.support import Call

ROOT = Path(__file__).resolve().parents[1]
INFO = _extension.build_info()
BUILT = bool(INFO and INFO.get("EXTENSION"))
requires_extension = pytest.mark.skipif(
    not BUILT, reason="alast_kernels._C was not built (no nvcc or CUDA torch at install time, or ALAST_SKIP_CUDA=1)")

SCHEMAS = {
    "select_tokens": "alast::select_tokens(Tensor scores, int keep, int num_prefix) -> Tensor",
    "gather_tokens": "alast::gather_tokens(Tensor x, Tensor idx) -> Tensor",
    "gather_tokens_backward":
        "alast::gather_tokens_backward(Tensor grad_out, Tensor idx, SymInt num_tokens) -> Tensor",
    "scatter_tokens": "alast::scatter_tokens(Tensor x, Tensor idx, Tensor delta) -> Tensor",
    "cls_scores": "alast::cls_scores(Tensor x, Tensor u, float eps) -> Tensor",
}
HALF_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_backend():
    from alast_kernels.backends import cuda
    return cuda


def _expected_version():
    cuda = torch.version.cuda.replace(".", "")
    torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return f"{alast_kernels.__version__}+cu{cuda}torch{torch_minor}"


def test_extension_built_where_a_toolkit_is_present():
    if os.environ.get("ALAST_SKIP_CUDA", "").lower() in ("1", "true", "yes", "on"):
        pytest.skip("ALAST_SKIP_CUDA is set")
    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip("no nvcc on PATH or a CPU-only torch: the extension is not expected")
    assert BUILT, "nvcc and a CUDA build of torch are present but alast_kernels._C was not built (make venv)"
    assert INFO["TORCH_VERSION"] == torch.__version__
    assert INFO["CUDA_VERSION"] == torch.version.cuda
    assert INFO["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert _extension.mismatch() is None


@requires_extension
def test_every_op_is_registered_with_its_schema():
    _cuda_backend()  # loads the library
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.alast, name).default._schema) == schema


@requires_extension
def test_backend_module_declares_its_ops_and_devices():
    cuda = _cuda_backend()
    assert set(cuda.OPS) == set(cuda.SUPPORTS) == {"select_tokens", "gather_tokens", "scatter_tokens", "cls_scores"}
    assert cuda.EMULATED == _cuda_emulation.requested()
    usable, other = ("cpu", "cuda") if cuda.EMULATED else ("cuda", "cpu")
    assert cuda.device_refusal(usable) is None and cuda.device_refusal(other) is not None
    assert _backend.refusal("cuda", "attention", Call(usable)) == "has no attention kernel"
    assert "k_norm" in _backend.refusal("cuda", "cls_scores", Call(usable, "float32", k_norm=True))
    assert "float64" in _backend.refusal("cuda", "gather_tokens", Call(usable, "float64"))


# ---------------------------------------------------------------- fake kernels: shapes, dtypes, tracing

@requires_extension
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_fake_kernels_give_output_shapes_under_fake_tensor_mode(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode
    _cuda_backend()
    B, N, K, D, H = 3, 11, 5, 24, 4
    with FakeTensorMode():
        x = torch.empty(B, N, D, device="cuda", dtype=dtype)
        idx = torch.empty(B, K, device="cuda", dtype=torch.int64)
        delta = torch.empty(B, K, D, device="cuda", dtype=dtype)
        sel = torch.ops.alast.select_tokens(torch.empty(B, N, device="cuda", dtype=dtype), K, 2)
        gathered = torch.ops.alast.gather_tokens(x, idx)
        back = torch.ops.alast.gather_tokens_backward(gathered, idx, N)
        scattered = torch.ops.alast.scatter_tokens(x, idx, delta)
        scores = torch.ops.alast.cls_scores(x, torch.empty(B, H, D, device="cuda"), 1e-6)
    for out, shape, out_dtype in ((sel, (B, K + 2), torch.int64), (gathered, (B, K, D), dtype),
                                  (back, (B, N, D), dtype), (scattered, (B, N, D), dtype),
                                  (scores, (B, N), torch.float32)):
        assert tuple(out.shape) == shape and out.dtype == out_dtype and out.device.type == "cuda"


@requires_extension
def test_forward_and_backward_trace_under_torch_compile():
    """On meta tensors (no GPU needed): the autograd.Functions and fake kernels trace into one graph,
    with dynamic shapes, and autograd produces gradients of the right shapes."""
    cuda = _cuda_backend()

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)
    def step(x, scores, u, delta):
        idx = cuda.select_tokens(scores, 4, 1)
        kept = cuda.gather_tokens(x, idx)
        out = cuda.scatter_tokens(x, idx, kept * delta)
        return out.sum() + torch.ops.alast.cls_scores(x, u, 1e-6).sum(), idx

    for N in (9, 12):
        x = torch.randn(2, N, 8, device="meta", requires_grad=True)
        delta = torch.randn(2, 5, 8, device="meta", requires_grad=True)
        loss, idx = step(x, torch.randn(2, N, device="meta"), torch.randn(2, 4, 8, device="meta"), delta)
        loss.backward()
        assert tuple(idx.shape) == (2, 5) and idx.dtype == torch.int64
        assert tuple(x.grad.shape) == (2, N, 8) and tuple(delta.grad.shape) == (2, 5, 8)


# ---------------------------------------------------------------- argument checks (run on CPU tensors)

def _cpu_cases():
    f = torch.randn
    long = torch.int64
    idx = torch.tensor([[0, 2], [1, 3]])
    x = f(2, 5, 6)
    return [
        ("select_tokens", (f(2, 5, 1), 2, 1), r"scores must be a 2-D tensor"),
        ("select_tokens", (torch.ones(2, 5, dtype=long), 2, 1), r"scores must be float32, float16 or bfloat16"),
        ("select_tokens", (f(2, 5, dtype=torch.float64), 2, 1), r"scores must be float32, float16 or bfloat16"),
        ("select_tokens", (f(5, 2).t(), 2, 1), r"scores must be contiguous"),
        ("select_tokens", (f(2, 5), 0, 1), r"keep must be in \[1, 4\]"),
        ("select_tokens", (f(2, 5), 5, 1), r"keep must be in \[1, 4\]"),
        ("select_tokens", (f(2, 5), 2, -1), r"num_prefix must be in \[0, 5\)"),
        ("gather_tokens", (f(2, 5), idx), r"x must be a 3-D tensor"),
        ("gather_tokens", (x, idx.int()), r"idx must be int64"),
        ("gather_tokens", (x, idx[:1]), r"idx must have batch size 2"),
        ("gather_tokens", (x, idx.t().contiguous().t()), r"idx must be contiguous"),
        ("gather_tokens", (x.transpose(1, 2).contiguous().transpose(1, 2), idx), r"x must be contiguous"),
        ("gather_tokens_backward", (f(2, 3, 6), idx, 5), r"idx must have 3 columns"),
        ("gather_tokens_backward", (f(2, 2, 6), idx, -1), r"num_tokens must be >= 0"),
        ("scatter_tokens", (x, idx, f(2, 2, 6, dtype=torch.float16)), r"delta must have x's dtype"),
        ("scatter_tokens", (x, idx, f(2, 3, 6)), r"delta must have shape \[2, 2, 6\]"),
        ("scatter_tokens", (x, torch.zeros(2, 6, dtype=long), f(2, 6, 6)),
         r"idx must have at most 5 \(unique\) indices"),
        ("cls_scores", (x, f(2, 3, 6, dtype=torch.float16), 1e-6), r"u must be float32"),
        ("cls_scores", (x, f(2, 3, 7), 1e-6), r"u must have shape \[2, H, 6\]"),
        ("cls_scores", (x, f(2, 3, 6), -1.0), r"eps must be >= 0"),
    ]


@requires_extension
@pytest.mark.parametrize("op,args,message", _cpu_cases())
def test_bad_arguments_fail_with_a_message_naming_them(op, args, message):
    _cuda_backend()
    with pytest.raises(RuntimeError, match=rf"alast::{op}: {message}"):
        getattr(torch.ops.alast, op)(*args)


# Good arguments on the wrong device: the last check of every op of the real extension.
_DEVICE_CASES = """
x, idx = torch.randn(2, 5, 6), torch.tensor([[0, 2], [1, 3]])
cases = [
    ("select_tokens", (torch.randn(2, 5), 2, 1), "scores must be a CUDA tensor, got one on cpu"),
    ("gather_tokens", (x, idx), "x must be a CUDA tensor"),
    ("gather_tokens_backward", (torch.randn(2, 2, 6), idx, 5), "grad_out must be a CUDA tensor"),
    ("scatter_tokens", (x, idx, torch.randn(2, 2, 6)), "x must be a CUDA tensor"),
    ("cls_scores", (x, torch.randn(2, 3, 6), 1e-6), "x must be a CUDA tensor"),
]
"""


@requires_extension
def test_real_extension_registers_the_schemas_and_refuses_cpu_tensors():
    """``alast_kernels._C`` itself, in a process without the emulation: the same schemas, a CUDA
    registration, and CPU tensors stopped by the device check (after every other check passed)."""
    code = f"""
import torch
import alast_kernels._extension as e
e.load()
import sys
assert "alast_kernels._C" in sys.modules
for name, schema in {SCHEMAS!r}.items():
    assert str(getattr(torch.ops.alast, name).default._schema) == schema, name
{_DEVICE_CASES}
for op, args, message in cases:
    try:
        getattr(torch.ops.alast, op)(*args)
    except RuntimeError as exc:
        assert f"alast::{{op}}: {{message}}" in str(exc), str(exc)
    else:
        raise AssertionError(op + " accepted CPU tensors")
print("real extension ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "ALAST_CUDA_EMULATION"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "real extension ok" in done.stdout, done.stderr[-3000:]


# ---------------------------------------------------------------- build metadata: mismatch and failed loads

@pytest.fixture
def fresh_extension_state(monkeypatch):
    """Undo what a test does to the extension loader's and backend switch's module-level state."""
    monkeypatch.setattr(_extension, "_warned", False)
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.delenv("ALAST_CUDA_EMULATION", raising=False)  # these tests are about loading _C
    monkeypatch.setattr(_cuda_emulation, "_library_path", None)
    monkeypatch.delattr(alast_kernels.backends, "cuda", raising=False)
    monkeypatch.setattr(_backend, "_import_errors", dict(_backend._import_errors))
    monkeypatch.delitem(sys.modules, "alast_kernels.backends.cuda", raising=False)
    return monkeypatch


def _fake_build_info(monkeypatch, **fields):
    module = types.ModuleType("alast_kernels._build_info")
    info = {"EXTENSION": True, "TORCH_VERSION": torch.__version__, "CUDA_VERSION": torch.version.cuda,
            "ARCH_LIST": "8.0;9.0+PTX", "PYTHON_VERSION": f"{sys.version_info.major}.{sys.version_info.minor}"}
    info.update(fields)
    for key, value in info.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, "alast_kernels._build_info", module)


def test_mismatched_build_warns_once_naming_both_sides_and_falls_back(fresh_extension_state):
    _fake_build_info(fresh_extension_state, TORCH_VERSION="2.9.0+cu128", CUDA_VERSION="12.8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.check_build() is not None          # what `import alast_kernels` runs
        reason = _backend.refusal("cuda", "select_tokens", Call("cuda"))
        with pytest.raises(ImportError):
            _extension.load()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "built for torch 2.9.0+cu128, CUDA 12.8" in messages[0]
    assert f"runs torch {torch.__version__}, CUDA {torch.version.cuda}" in messages[0]
    assert reason is not None and "built for torch 2.9.0+cu128" in reason
    # Ops still run: on CPU tensors the switch uses the reference backend, as always.
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert alast_kernels.ops.select_tokens(scores, 2, 1).tolist() == [[0, 1, 3]]


def test_failed_shared_library_load_warns_once_and_raises_import_error(fresh_extension_state):
    _fake_build_info(fresh_extension_state)
    real_import = _extension.importlib.import_module

    def failing_import(name, *args):
        if name == "alast_kernels._C":
            raise OSError("_C.so: undefined symbol: _ZN3c104impl8GPUTrace9haveStateE")
        return real_import(name, *args)

    fresh_extension_state.setattr(_extension.importlib, "import_module", failing_import)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(ImportError, match="undefined symbol"):
                _extension.load()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert f"built for torch {torch.__version__}" in messages[0] and "failed to load" in messages[0]


def test_install_without_extension_loads_nothing_and_stays_quiet(fresh_extension_state):
    module = types.ModuleType("alast_kernels._build_info")
    module.EXTENSION = False
    fresh_extension_state.setitem(sys.modules, "alast_kernels._build_info", module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.check_build() is None
        with pytest.raises(ImportError, match="installed without its CUDA extension"):
            _extension.load()


def test_import_does_not_load_the_shared_library():
    code = "import sys, alast_kernels; assert 'alast_kernels._C' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ---------------------------------------------------------------- the wheel

@pytest.mark.slow
@requires_extension
def test_wheel_builds_with_cuda_tag_and_imports_in_a_fresh_venv(tmp_path):
    """Builds the wheel (reusing the editable install's objects: ninja only relinks), checks its name and
    contents, installs it into a new venv that sees torch through a .pth file, and imports it there."""
    env = dict(os.environ, ALAST_FORCE_CUDA="1")
    for name in ("ALAST_SKIP_CUDA", "PYTHONPATH", "ALAST_CUDA_EMULATION"):
        env.pop(name, None)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(dist), str(ROOT)], cwd=ROOT, env=env, check=True, timeout=1500,
                   capture_output=True)
    wheels = sorted(dist.glob("*.whl"))
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    expected = f"alast_kernels-{_expected_version()}-{py}-{py}-linux_x86_64.whl"
    assert [w.name for w in wheels] == [expected]

    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        assert f"alast_kernels/_C{sysconfig.get_config_var('EXT_SUFFIX')}" in names
        assert not any(n.startswith(("csrc/", "tests/")) for n in names)
        info = {}
        exec(whl.read("alast_kernels/_build_info.py").decode(), info)
    assert info["EXTENSION"] is True and info["TORCH_VERSION"] == torch.__version__
    assert info["CUDA_VERSION"] == torch.version.cuda and info["ARCH_LIST"]

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    fresh_python = fresh / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "-q", "--no-deps",
                    "--no-index", str(wheels[0])], env=env, check=True, timeout=600, capture_output=True)
    site = subprocess.run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # torch and friends from this environment's site directories, listed as plain paths: their .pth files
    # (among them the editable alast_kernels) are not processed, so the package comes from the wheel.
    dev_sites = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    Path(site, "_alast_dev_site.pth").write_text("\n".join(dev_sites) + "\n")

    check = f"""
import warnings; warnings.simplefilter("error", RuntimeWarning)
import torch, alast_kernels
assert alast_kernels.__file__.startswith({str(fresh)!r}), alast_kernels.__file__
from alast_kernels.backends import cuda
assert sorted(cuda.OPS) == ["cls_scores", "gather_tokens", "scatter_tokens", "select_tokens"]
assert str(torch.ops.alast.select_tokens.default._schema) == {SCHEMAS["select_tokens"]!r}
try:
    torch.ops.alast.select_tokens(torch.zeros(1, 3), 1, 1)
except RuntimeError as e:
    assert "must be a CUDA tensor" in str(e)
else:
    raise AssertionError("CPU scores accepted")
print("fresh venv ok")
"""
    done = subprocess.run([str(fresh_python), "-c", check], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "fresh venv ok" in done.stdout, done.stderr[-3000:]
