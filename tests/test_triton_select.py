"""Triton top-k selection against the reference: exact indices, ties, NaN, signed zeros, long rows."""
import pytest
import torch

from alast_kernels import ops
from alast_kernels.backends.triton import select as triton_select
from triton_testing import (DEVICE, REFERENCE_OPS, TRITON_OPS, nan_outputs, requires_gpu,  # noqa: F401
                            triton_forced)


def _scores(kind: str, B: int, N: int, dtype, gen):
    if kind == "random":
        return torch.randn(B, N, generator=gen).to(dtype)
    if kind == "ties":  # few distinct values: most of the choice is tie-breaking
        return torch.randint(0, 3, (B, N), generator=gen).to(dtype)
    s = torch.randn(B, N, generator=gen).to(dtype)  # "special": NaN, ±0, ±inf among ordinary values
    s[:, 1::5] = 0.0
    s[:, 2::5] = -0.0
    s[0, 3] = float("nan")
    s[-1, 4] = float("-nan")
    s[0, -1] = float("inf")
    s[-1, -2] = float("-inf")
    return s


F32, F16 = torch.float32, torch.float16


@pytest.mark.parametrize("kind, dtype, N, P, keep", [
    ("random", F32, 14, 1, 5), ("random", F16, 32, 4, 17), ("ties", F32, 14, 1, 13), ("ties", F16, 24, 2, 1),
    ("ties", F32, 32, 4, 17), ("special", F32, 14, 1, 5), ("special", F16, 14, 1, 13), ("special", F32, 24, 2, 22),
])
def test_matches_reference(nan_outputs, kind, dtype, N, P, keep):
    gen = torch.Generator().manual_seed(N * 31 + keep)
    scores = _scores(kind, 2, N, dtype, gen).to(DEVICE)
    got = TRITON_OPS["select_tokens"](scores, keep, P)
    assert got.dtype == torch.int64 and got.shape == (2, P + keep)
    assert torch.equal(got, REFERENCE_OPS["select_tokens"](scores, keep, P))


def test_rows_longer_than_one_block(monkeypatch, nan_outputs):
    monkeypatch.setattr(triton_select, "_MAX_BLOCK", 16)  # 38 candidates -> three blocks per pass
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (2, 39), generator=gen).float().to(DEVICE)
    assert torch.equal(TRITON_OPS["select_tokens"](scores, 20, 1), REFERENCE_OPS["select_tokens"](scores, 20, 1))


def test_non_contiguous_rows(nan_outputs):
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(14, 3, generator=gen).to(DEVICE).t()
    assert not scores.is_contiguous()
    assert torch.equal(TRITON_OPS["select_tokens"](scores, 6, 1), REFERENCE_OPS["select_tokens"](scores, 6, 1))


def test_float64_scores_run_the_reference(triton_forced):
    """float64 scores as float32 keys could merge distinct scores: the backend declares it does not take
    them, and the dispatcher runs the reference, which tells apart scores float32 cannot."""
    scores = torch.tensor([[0.0, 1.0, 1.0 + 1e-12, 0.5]], dtype=torch.float64, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="select_tokens falls back to the reference backend .*float64"):
        assert ops.select_tokens(scores, 1).tolist() == [[0, 2]]


def test_public_op_and_bad_inputs(triton_forced):
    scores = torch.randn(2, 14, device=DEVICE)
    assert torch.equal(ops.select_tokens(scores, 4), REFERENCE_OPS["select_tokens"](scores, 4, 1))
    with pytest.raises(ValueError, match="keep"):
        ops.select_tokens(scores, 14)
    with pytest.raises(ValueError, match="keep"):
        ops.select_tokens(scores, 0)
    with pytest.raises(TypeError, match="scores"):
        ops.select_tokens(scores.long(), 4)


def test_cpu_tensors_without_interpreter_run_the_reference(monkeypatch, triton_forced):
    if DEVICE.type != "cpu":
        pytest.skip("CPU tensors on a GPU machine run the reference by design")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    scores = torch.randn(2, 14)
    with pytest.warns(RuntimeWarning, match="triton: CPU tensors run only under the Triton interpreter"):
        assert torch.equal(ops.select_tokens(scores, 4), REFERENCE_OPS["select_tokens"](scores, 4, 1))


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, keep", [(197, 98), (4097, 2048), (8193, 100)])
def test_gpu_long_rows(nan_outputs, dtype, N, keep):
    gen = torch.Generator().manual_seed(N)
    for kind in ("random", "ties", "special"):
        scores = _scores(kind, 16, N, dtype, gen).cuda()
        assert torch.equal(TRITON_OPS["select_tokens"](scores, keep, 1),
                           REFERENCE_OPS["select_tokens"](scores, keep, 1))
