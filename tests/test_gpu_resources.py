"""The static GPU resource report (benchmarks/gpu_resources.py, ``make gpu-resources``): the occupancy
formula against hand-derived cases, the ptxas parsing, and the committed report — every kernel in it,
zero spills, memory-bound kernels at ≥ 50% occupancy or their miss named with its cause, the same launch
configurations the launchers choose now, and docs/gpu-resources.md's table equal to it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gpu_resources as report
import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMITTED = json.loads(report.RESULTS.read_text())


@pytest.mark.parametrize("threads, registers, shared, blocks, occupancy, limiter", [
    # 8 warps of 32 registers: 8 blocks fill the 64 warps.
    (256, 32, 0, 8, 1.0, "warps"),
    # 1024 threads of 40 registers: 40·32 = 1280 per warp, 32 warps -> 40960 per block, one block fits.
    (1024, 40, 0, 1, 0.5, "registers"),
    # 41 registers round up to 48 per thread (1536 per warp): 4 warps -> 6144 per block -> 10 blocks.
    (128, 41, 0, 10, 40 / 64, "registers"),
    # 100 KiB of shared memory (+1 KiB reserved): 2 blocks of 4 warps.
    (128, 16, 100 * 1024, 2, 8 / 64, "shared memory"),
    # 32 threads, few registers: the 32-block limit leaves half the warps empty.
    (32, 16, 0, 32, 0.5, "blocks"),
])
def test_occupancy_formula(threads, registers, shared, blocks, occupancy, limiter):
    got = report.occupancy(threads, registers, shared)
    assert got["blocks_per_sm"] == blocks and got["limiter"] == limiter
    assert got["occupancy"] == pytest.approx(occupancy)


def test_ptxas_log_and_kernel_names_are_parsed():
    log = """ptxas info    : Compiling entry function '_ZN5alast4kernEv' for 'sm_90'
ptxas info    : Function properties for _ZN5alast4kernEv
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 38 registers, used 1 barriers, 1168 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'other' for 'sm_90'
ptxas info    : Used 16 registers, used 0 barriers, 380 bytes cmem[0]
"""
    assert report.ptxas_usage(log) == {
        "_ZN5alast4kernEv": {"registers": 38, "spill_stores": 4, "spill_loads": 12, "stack": 8, "static_shared": 1168},
        "other": {"registers": 16, "spill_stores": 0, "spill_loads": 0, "stack": 0, "static_shared": 0}}
    ptxas_name = ("void alast::(anonymous namespace)::scatter_rows_kernel<alast::BF16, (int)8>(alast::BF16::raw "
                  "const*, int const*)")
    assert report.short_name(ptxas_name) == report.short_name("alast::{anonymous}::scatter_rows_kernel<alast::BF16, 8>")
    assert report.short_name(ptxas_name) == "scatter_rows_kernel<BF16, 8>"


def test_cuda_kernels_are_compiled_with_the_extensions_sources_and_flags(monkeypatch):
    """The report's ptxas runs take setup.py's own source list (every ``csrc/*.cu``, found by setup.py) and
    nvcc flags, not copies of them."""
    setup = report.build_script()
    assert setup.cuda_sources() == ["csrc/ops.cpp"] + sorted(
        f"csrc/{p.name}" for p in (ROOT / "csrc").glob("*.cu"))
    commands = []

    def fake_nvcc(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(report.shutil, "which", lambda name: "/usr/bin/nvcc")
    monkeypatch.setattr(report.subprocess, "run", fake_nvcc)
    monkeypatch.setattr(report, "demangle", lambda names: {})
    assert report.cuda_resources(90) == {}
    assert [c[c.index("-c") + 1] for c in commands] == [str(ROOT / p) for p in setup.cuda_sources()[1:]]
    assert all(c[2:2 + len(setup.NVCC_FLAGS)] == setup.NVCC_FLAGS for c in commands)


def _kernels_in_sources():
    cuda = set(re.findall(r"__global__ void (\w+)", "".join(p.read_text() for p in (ROOT / "csrc").glob("*.cu"))))
    triton = set()
    for path in (ROOT / "alast_kernels" / "backends" / "triton").glob("*.py"):
        text = path.read_text()
        triton |= {name for name in re.findall(r"@triton\.jit\ndef (\w+)", text) if re.search(rf"{name}\[", text)}
    return cuda, triton


def test_report_covers_every_kernel_with_zero_spills_and_memory_bound_kernels_at_half_occupancy():
    cuda, triton = _kernels_in_sources()
    reported = {(r["backend"], report.base_name(r["kernel"])) for r in COMMITTED["kernels"]}
    assert {("cuda", k) for k in cuda} | {("triton", k) for k in triton} <= reported
    for row in COMMITTED["kernels"]:
        assert row["spill_bytes"] == {"sm_90": 0, "sm_80": 0}, row
        if row["memory_bound"] is not None:  # at the target, or short of it with the cause named
            assert row["occupancy"] >= COMMITTED["occupancy_target_memory_bound"] or row["miss_cause"], row
        assert row["occupancy"] == pytest.approx(report.occupancy(
            row["threads"], row["registers"]["sm_90"], row["static_shared_bytes"] + row["dynamic_shared_bytes"])[
            "occupancy"])


def test_committed_report_has_the_launchers_current_configurations_and_the_docs_its_table():
    """A launcher whose block size or warps changed, or a new kernel, makes the report stale: regenerate it
    with ``make gpu-resources`` (needs nvcc)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_resources.py"), "--check"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
