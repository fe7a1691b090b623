"""The CUDA emulation itself (csrc/emulation/simt.h): small kernels whose results follow from the CUDA
execution model, and deliberately broken kernels it must stop — so the emulated CUDA op tests are shown
able to fail. The kernels are in tests/cuda_emulation_kernels.cu, built with the emulation runtime.
"""
import ctypes
import re

import pytest

from alast_kernels import _cuda_emulation

CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_INVALID_CONFIGURATION = 9
CUDA_ERROR_ILLEGAL_ADDRESS = 700
CUDA_ERROR_ASSERT = 710
CUDA_ERROR_LAUNCH_FAILURE = 719
KERNELS = _cuda_emulation.CSRC.parent / "tests" / "cuda_emulation_kernels.cu"


@pytest.fixture(scope="module")
def run():
    """``run(case, n) -> (status, message, out)`` for a case of cuda_emulation_kernels.cu."""
    path = _cuda_emulation.build("alast_emulation_cases", [(_cuda_emulation.RUNTIME, ()),
                                                           (KERNELS, _cuda_emulation.KERNEL_FLAGS)])
    lib = ctypes.CDLL(str(path))
    lib.run_case.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_int]

    def call(case, n=1024):
        out = (ctypes.c_int * n)(*([-1] * n))
        message = ctypes.create_string_buffer(2048)
        status = lib.run_case(case.encode(), out, n, message, len(message))
        return status, message.value.decode(), list(out)
    return call


# ------------------------------------------------------------------------------------------ semantics
def test_every_thread_of_every_block_sees_its_coordinates(run):
    status, message, out = run("coordinates")
    assert status == 0, message
    threads, blocks = 4 * 2 * 2, 2 * 3
    rows = [tuple(out[3 * i:3 * i + 3]) for i in range(blocks * threads)]
    assert rows == [(t, b, threads) for b in range(blocks) for t in range(threads)]


def test_barrier_and_shuffle_up_give_a_block_prefix_sum(run):
    status, message, out = run("block_scan")
    assert status == 0, message
    expected = [t * (t + 1) // 2 for t in range(256)]
    assert out[:512] == expected + expected


def test_ballot_butterfly_popc_and_shared_atomics(run):
    status, message, out = run("warp_ops")
    assert status == 0, message
    assert out[:7] == [1, 16, sum(range(32)), 16, 16, 16, 16]


# ------------------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("case, status, message", [
    ("dynamic_shared_overflow", CUDA_ERROR_LAUNCH_FAILURE,
     r"dynamic shared memory index 63 is outside \[0, 63\) \(252 bytes of 4-byte elements"),
    ("static_shared_overflow", CUDA_ERROR_ILLEGAL_ADDRESS,
     r"index 3\d out of bounds for type 'int \[32\]' \(.*cuda_emulation_kernels.cu:\d+"),
    ("divergent_barrier", CUDA_ERROR_LAUNCH_FAILURE, r"every thread of a block must reach each barrier"),
    ("shuffle_with_exited_lanes", CUDA_ERROR_LAUNCH_FAILURE,
     r"(exited without reaching it|lane \d+ exited while lanes 0x[0-9a-f]+ wait for it)"),
    ("lane_outside_its_mask", CUDA_ERROR_LAUNCH_FAILURE,
     r"__ballot_sync: the calling lane \d+ is not in mask 0x00000001"),
    ("failed_device_check", CUDA_ERROR_ASSERT,
     r"thread \(5, 0, 0\): device-side assertion `threadIdx.x != 5` failed .*: alast_kernels: thread 5 is not "
     r"allowed$"),
    ("too_many_threads", CUDA_ERROR_INVALID_CONFIGURATION, r"invalid block \(1025, 1, 1\)"),
    ("empty_grid", CUDA_ERROR_INVALID_CONFIGURATION, r"invalid grid \(0, 1, 1\)"),
    ("too_much_dynamic_shared", CUDA_ERROR_INVALID_VALUE, r"49156 bytes of dynamic shared memory exceed the 49152"),
])
def test_broken_kernels_and_launches_are_stopped_with_a_message(run, case, status, message):
    got_status, got_message, _ = run(case)
    assert got_status == status, got_message
    assert re.search(message, got_message), got_message
    if status not in (CUDA_ERROR_INVALID_CONFIGURATION, CUDA_ERROR_INVALID_VALUE):
        assert "CUDA emulation: kernel " in got_message and "block (0, 0, 0)" in got_message


def test_a_fault_does_not_outlive_its_launch(run):
    assert run("divergent_barrier")[0] != 0
    status, message, out = run("block_scan")
    assert status == 0, message
    assert out[255] == 255 * 256 // 2
