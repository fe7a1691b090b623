"""CUDA emulation: the kernels of ``csrc/`` compiled as host C++ and run on CPU tensors.

With ``ALAST_CUDA_EMULATION=1`` the ``cuda`` backend loads this library instead of ``alast_kernels._C``: the
very ``.cu`` sources, compiled by the host C++ compiler against ``csrc/emulation/simt.h`` (a thread block as
concurrently running host threads, a real barrier for ``__syncthreads``, warp operations with the ``_sync``
rules, bounds-checked shared memory), and ``csrc/ops.cpp`` registering the same ``torch.ops.alast`` ops for
CPU tensors. The backend's Python code (autograd Functions, op calls) runs unchanged on top.

The library is built on first use and cached, keyed by the sources, the compiler, torch and the flags, under
``$ALAST_CACHE_DIR/cuda-emulation`` (default ``~/.cache/alast_kernels``), so a source checkout needs no
separate build step. It needs the ``csrc/`` directory of a source checkout and a C++20 compiler (``$CXX``,
default ``c++``); a wheel does not ship it. ``docs/cuda-emulation.md`` says what the emulation shows and what
it cannot.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import torch

ENV = "ALAST_CUDA_EMULATION"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
RUNTIME = CSRC / "emulation" / "simt.cpp"
OPS = CSRC / "ops.cpp"

_COMMON_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-fvisibility=hidden", "-pthread", "-DALAST_EMULATION")
# The kernels: .cu files read as C++; every static array index checked (reported as a fault of the launch).
KERNEL_FLAGS = ("-x", "c++", "-fsanitize=bounds")

_library_path: Path | None = None


def requested() -> bool:
    """Whether ``ALAST_CUDA_EMULATION`` asks for the emulation."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def kernel_sources() -> List[Path]:
    """Every ``.cu`` file of ``csrc/``: each launcher's kernels."""
    return sorted(CSRC.glob("*.cu"))


def cache_root() -> Path:
    base = os.environ.get("ALAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "alast_kernels")
    return Path(base) / "cuda-emulation"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _torch_flags() -> Tuple[List[str], List[str]]:
    """Compile and link flags for code that uses torch's C++ API (the paths torch's own extensions use)."""
    root = Path(torch.__file__).resolve().parent
    compile_flags = [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
                     f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    lib = root / "lib"
    return compile_flags, [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu"]


def _key(sources: Sequence[Tuple[Path, Tuple[str, ...]]], link: Sequence[str]) -> str:
    """Everything the library depends on: compiler, torch, flags, and every file under ``csrc/``."""
    digest = hashlib.sha256()
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout
    digest.update(f"{version}\n{torch.__version__}\n{link}\n".encode())
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    files += [path for path, _ in sources if CSRC not in path.parents]
    for path, flags in sources:
        digest.update(f"{path}:{flags}\n".encode())
    for path in files:
        digest.update(str(path.relative_to(path.anchor)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _run(command: List[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ImportError(f"building the CUDA emulation failed: {' '.join(command)}\n{done.stderr[-4000:]}")


def build(name: str, sources: Sequence[Tuple[Path, Tuple[str, ...]]], link: Sequence[str] = ()) -> Path:
    """Compile ``sources`` (each with its extra flags) into ``<cache>/<name>-<key>/lib<name>.so``, unless a
    library with the same key is already there; returns its path."""
    if not CSRC.is_dir():
        raise ImportError(f"the CUDA emulation compiles the C++ sources of a source checkout; {CSRC} is missing")
    out_dir = cache_root() / f"{name}-{_key(sources, link)}"
    library = out_dir / f"lib{name}.so"
    if library.exists():
        return library
    work = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    objects = [work / f"{i}-{path.stem}.o" for i, (path, _) in enumerate(sources)]
    commands = [[_compiler(), *_COMMON_FLAGS, f"-I{CSRC}", *flags, "-c", str(path), "-o", str(obj)]
                for (path, flags), obj in zip(sources, objects)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_run, commands))
    linked = work / library.name
    _run([_compiler(), "-shared", "-pthread", *map(str, objects), *link, "-o", str(linked)])
    out_dir.mkdir(parents=True, exist_ok=True)
    os.replace(linked, library)  # atomic: a concurrent build of the same key writes the same file
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    return library


def build_ops_library() -> Path:
    """The emulated ``torch.ops.alast`` library: the kernels, the runtime and ``ops.cpp``."""
    torch_compile, torch_link = _torch_flags()
    sources = [(path, KERNEL_FLAGS) for path in kernel_sources()]
    sources += [(RUNTIME, ()), (OPS, tuple(torch_compile))]
    return build("alast_emulated_ops", sources, torch_link)


def load() -> Path:
    """Build (or find in the cache) and load the emulated ops; ``ImportError`` with the reason if impossible."""
    global _library_path
    if _library_path is None:
        path = build_ops_library()
        torch.ops.load_library(str(path))
        _library_path = path
    return _library_path


def loaded() -> bool:
    return _library_path is not None


# ------------------------------------------------------------------------------------------ launch records
@dataclass(frozen=True)
class Launch:
    """One kernel launch as the emulator saw it: the kernel (C++ name with template arguments), grid, block
    and dynamic shared memory in bytes."""
    kernel: str
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    shared_bytes: int

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]


def _control(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # the library torch loaded: the same handle and state
    lib.alast_emulation_record.argtypes = [ctypes.c_int]
    lib.alast_emulation_record.restype = ctypes.c_int
    lib.alast_emulation_take_launches.restype = ctypes.c_char_p
    return lib


@contextlib.contextmanager
def recorded_launches(run: bool = True, library: Path | None = None) -> Iterator[List[Launch]]:
    """Records every kernel launch inside the block into the yielded list (filled on exit). With
    ``run=False`` kernels are not executed at all (outputs stay unwritten): launch configurations only."""
    lib = _control(library or load())
    lib.alast_emulation_take_launches()  # drop anything recorded before
    previous = lib.alast_emulation_record(1 if run else 2)
    launches: List[Launch] = []
    try:
        yield launches
    finally:
        lib.alast_emulation_record(previous)
        for line in lib.alast_emulation_take_launches().decode().splitlines():
            kernel, grid, block, shared = line.split("\t")
            launches.append(Launch(kernel, tuple(map(int, grid.split(","))), tuple(map(int, block.split(","))),
                                   int(shared)))
