"""The triton backend's kernels compile for real GPUs (sm_80, sm_90) — checked without a GPU.

The interpreter runs kernels as NumPy code and accepts things the compiler rejects (non-constexpr
globals, unsupported dot shapes, too much shared memory); this test runs Triton's full CUDA pipeline,
ptxas included, in a subprocess without ``TRITON_INTERPRET``.
"""
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("triton_compile_check.py")
ROOT = SCRIPT.parent.parent


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_cuda(arch):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(SCRIPT), str(arch)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "all kernels compiled" in run.stdout
    # Shared memory per program must fit an A100's (164 KB) and an H100's (227 KB) limit.
    shared = [int(line.rsplit("shared=", 1)[1]) for line in run.stdout.splitlines() if "shared=" in line]
    assert shared and max(shared) <= 160 * 1024, max(shared)
