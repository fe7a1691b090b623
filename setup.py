"""Build script: the Python package, plus the CUDA extension ``alast_kernels._C`` when it can be built.

The extension is built when torch is importable at build time (``pip install --no-build-isolation``), torch
is a CUDA build, a CUDA toolkit is found, and a GPU is visible or ``ALAST_FORCE_CUDA=1``. Switches:

``ALAST_FORCE_CUDA=1``   build the extension without a visible GPU (how CI builds); fail if it cannot be built.
``ALAST_SKIP_CUDA=1``    never build it: a pure-Python install that runs the Triton and reference backends.
``TORCH_CUDA_ARCH_LIST`` GPU architectures to compile for; default ``8.0;8.6;8.9;9.0+PTX``.
``MAX_JOBS``             parallel compile jobs (ninja).
``CUDA_HOME``            the toolkit; else ``CUDA_PATH``, else the one the ``nvcc`` on PATH runs.

With the extension the version carries a local tag naming CUDA and torch (``0.1.0+cu130torch2.14``), and
``alast_kernels/_build_info.py`` records what it was built for; the package checks that at import.
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
# The compiler flags of the extension; benchmarks/gpu_resources.py compiles the kernels with the same ones.
CXX_FLAGS = ["-O3", "-g0"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def cuda_sources():
    """The extension's sources, relative to the project root: ``csrc/*.cpp`` (the op registrations) and
    ``csrc/*.cu`` (one launcher file per kernel family), found rather than listed, so a new kernel file is
    compiled without editing this script."""
    found = [sorted(glob.glob(os.path.join(ROOT, "csrc", pattern))) for pattern in ("*.cpp", "*.cu")]
    return [os.path.join("csrc", os.path.basename(path)) for paths in found for path in paths]


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvcc_home():
    """The toolkit root the ``nvcc`` on PATH compiles with (it may be a wrapper script, so ask it)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else os.path.dirname(os.path.dirname(nvcc))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _nvcc_home()
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


def _cuda_plan():
    """``(torch, cuda_home)`` when the extension is to be built, else ``(None, reason)``."""
    if _flag("ALAST_SKIP_CUDA"):
        return None, "ALAST_SKIP_CUDA=1"
    force = _flag("ALAST_FORCE_CUDA")
    try:
        import torch
    except ImportError:
        problems = ["torch is not importable at build time (install torch first, then pip install "
                    "--no-build-isolation)"]
    else:
        home = _cuda_home()
        problems = []
        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is not a CUDA build")
        if home is None:
            problems.append("no CUDA toolkit found (set CUDA_HOME)")
        if not force and not torch.cuda.is_available():
            problems.append("no GPU is visible (ALAST_FORCE_CUDA=1 builds anyway)")
        if not problems:
            return torch, home
    if force:
        sys.exit("setup.py: ALAST_FORCE_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(problems))
    return None, "; ".join(problems)


def _write_build_info(fields):
    lines = ['"""What the compiled extension alast_kernels._C was built for (written by setup.py)."""']
    lines += [f"{key} = {value!r}" for key, value in fields.items()]
    with open(os.path.join(ROOT, "alast_kernels", "_build_info.py"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    about = {}
    with open(os.path.join(ROOT, "alast_kernels", "_version.py")) as f:
        exec(f.read(), about)
    version = about["__version__"]
    python = ".".join(platform.python_version_tuple()[:2])

    torch, home = _cuda_plan()
    if torch is None:
        print(f"setup.py: building without the CUDA extension ({home})", file=sys.stderr)
        _write_build_info({"EXTENSION": False, "PYTHON_VERSION": python})
        setup(version=version)
        return

    os.environ["CUDA_HOME"] = home  # before cpp_extension guesses it from PATH
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cuda = torch.version.cuda                               # e.g. "13.0"
    torch_release = torch.__version__.split("+")[0]         # e.g. "2.14.1"
    torch_minor = ".".join(torch_release.split(".")[:2])
    _write_build_info({
        "EXTENSION": True,
        "TORCH_VERSION": torch.__version__,
        "CUDA_VERSION": cuda,
        "ARCH_LIST": os.environ["TORCH_CUDA_ARCH_LIST"],
        "PYTHON_VERSION": python,
    })

    class BuildExt(BuildExtension):
        """Compiles in one fixed build directory so that editable installs and wheel builds share objects
        (ninja then recompiles only what changed) instead of compiling in a fresh temporary directory."""

        def finalize_options(self):
            super().finalize_options()
            tag = f"cu{cuda.replace('.', '')}-torch{torch_release}-py{python}"
            self.build_temp = os.path.join(ROOT, "build", f"temp-alast-{tag}")

    include = [os.path.join(ROOT, "csrc")]
    ext = CUDAExtension(
        "alast_kernels._C",
        sources=cuda_sources(),
        include_dirs=include,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    setup(
        version=f"{version}+cu{cuda.replace('.', '')}torch{torch_minor}",
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    )


# setuptools runs this script as __main__; benchmarks/gpu_resources.py imports it for its flags and sources.
if __name__ == "__main__":
    main()
