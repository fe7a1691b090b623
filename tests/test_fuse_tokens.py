"""``ops.fuse_tokens``: the reference against the naive float64 derivation (tests/_naive.py) and gradcheck,
the Triton kernels against both under the interpreter (float32 tight, float16 by the flash rule), ties,
``keep == Np``, NaN-prefilled outputs, several tiles per row, and the argument checks.

Odd sizes: ``N = 1 + 13`` or ``1 + 23`` tokens, ``D = 30`` or ``40`` channels.
"""
import pytest
import torch

import _naive as naive
import alast_kernels
from alast_kernels import ops
from alast_kernels.backends.triton import fuse as triton_fuse
from triton_testing import (DEVICE, DTYPES, REFERENCE_OPS, TRITON_OPS, assert_flash_rule, grads,  # noqa: F401
                            nan_outputs, requires_gpu, triton_forced)

B, N, D = 2, 14, 30
# (atol, rtol) against the float64 derivation from the same rounded inputs: a few units of each dtype's
# rounding of the O(1) fused token.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3),
       torch.bfloat16: (3e-2, 3e-2)}


def _inputs(gen, dtype=torch.float32, b=B, n=N, d=D, ties=False, device="cpu"):
    x = torch.randn(b, n, d, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    if ties:  # few distinct values: the choice is mostly tie-breaking
        scores = torch.randint(0, 3, (b, n), generator=gen).float() / 4
    else:
        scores = torch.rand(b, n, generator=gen).softmax(-1)  # like an attention row
    return x, scores.to(device)


def _assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.usefixtures("reference_backend")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_prefix, keep", [(1, 1), (1, 6), (1, 12), (3, 7), (0, 5)])
def test_reference_matches_naive(dtype, num_prefix, keep):
    gen = torch.Generator().manual_seed(keep * 7 + num_prefix)
    x, scores = _inputs(gen, dtype)
    out = ops.fuse_tokens(x, scores, keep, num_prefix)
    assert out.dtype == dtype and out.shape == (B, num_prefix + keep + 1, D)
    want = naive.fuse_tokens(x, scores, keep, num_prefix)
    assert torch.equal(out[:, :-1].double(), want[:, :-1])  # prefix and kept tokens are copies
    _assert_close(out[:, -1], want[:, -1], dtype)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    (gx,) = grads(out, [x], g)
    _assert_close(gx, naive.fuse_tokens_grad(g, scores, keep, num_prefix), dtype)


@pytest.mark.usefixtures("reference_backend")
def test_reference_gradcheck_and_scores_get_no_gradient():
    gen = torch.Generator().manual_seed(1)
    x, scores = _inputs(gen, torch.float64, n=8, d=3)
    scores.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.fuse_tokens(t, scores, 3, 1), (x,))
    ops.fuse_tokens(x, scores, 3, 1).sum().backward()
    assert scores.grad is None and x.grad is not None


@pytest.mark.usefixtures("reference_backend")
def test_ties_go_to_the_lower_index_and_the_fused_token_is_a_weighted_sum():
    x = torch.arange(2 * 10 * 2, dtype=torch.float32).reshape(2, 10, 2)
    scores = torch.tensor([[5.0, 0.5, 0.9, 0.5, 0.9, 0.1, 0.5, 0.9, 0.5, 0.2],
                           [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = ops.fuse_tokens(x, scores, 5, 1)
    kept = ops.select_tokens(scores, 5, 1)
    assert kept.tolist() == [[0, 1, 2, 3, 4, 7], [0, 1, 2, 3, 4, 5]]
    assert torch.equal(out[:, :-1], torch.stack([x[b, kept[b]] for b in range(2)]))
    # Row 0 drops 5, 6, 8, 9 (scores 0.1, 0.5, 0.5, 0.2); row 1 drops 6..9 (score 1): a sum, not a mean.
    fused0 = 0.1 * x[0, 5] + 0.5 * x[0, 6] + 0.5 * x[0, 8] + 0.2 * x[0, 9]
    torch.testing.assert_close(out[0, -1], fused0)
    assert torch.equal(out[1, -1], x[1, 6:].sum(0))


@pytest.mark.usefixtures("reference_backend")
@pytest.mark.parametrize("num_prefix", [1, 3])
def test_keep_all_gives_a_zero_fused_token(num_prefix):
    gen = torch.Generator().manual_seed(2)
    x, scores = _inputs(gen)
    out = ops.fuse_tokens(x, scores, N - num_prefix, num_prefix)
    assert torch.equal(out[:, :-1], x) and torch.equal(out[:, -1], torch.zeros(B, D))
    g = torch.randn(out.shape, generator=gen)
    assert torch.equal(grads(out, [x], g)[0], g[:, :-1])


@pytest.mark.usefixtures("reference_backend")
def test_reference_runs_on_meta_tensors():
    """FLOPs of a method are counted on the meta device: the op must run there."""
    x = torch.empty(2, 197, 768, device="meta")
    assert ops.fuse_tokens(x, torch.empty(2, 197, device="meta"), 138).shape == (2, 140, 768)


# --------------------------------------------------------------------------------------------- triton
def _check_triton(x, scores, keep, num_prefix, gen):
    """The kernel against the reference (same dtype) and the float64 derivation, forward and backward."""
    dtype = x.dtype
    got = TRITON_OPS["fuse_tokens"](x, scores, keep, num_prefix)
    want = REFERENCE_OPS["fuse_tokens"](x, scores, keep, num_prefix)
    exact = naive.fuse_tokens(x.cpu(), scores.cpu(), keep, num_prefix)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got[:, :-1], want[:, :-1])
    g = torch.randn(want.shape, generator=gen).to(dtype).to(x.device)
    (gx,), (rx,) = grads(got, [x], g), grads(want, [x], g)
    exact_grad = naive.fuse_tokens_grad(g.cpu(), scores.cpu(), keep, num_prefix)
    if dtype == torch.float32:
        torch.testing.assert_close(got[:, -1].double().cpu(), exact[:, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx.double().cpu(), exact_grad, atol=1e-6, rtol=1e-6)
    else:
        assert_flash_rule("fused", got[:, -1].cpu(), want[:, -1].cpu(), exact[:, -1], slack=1e-3)
        assert_flash_rule("grad_x", gx.cpu(), rx.cpu(), exact_grad, slack=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_prefix, keep, ties", [(1, 5, False), (1, 12, True), (3, 1, False), (0, 9, True)])
def test_triton_matches_reference_and_naive(nan_outputs, dtype, num_prefix, keep, ties):
    gen = torch.Generator().manual_seed(keep * 11 + num_prefix)
    x, scores = _inputs(gen, dtype, d=40, ties=ties, device=DEVICE)
    _check_triton(x, scores, keep, num_prefix, gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_keep_all_writes_a_zero_fused_token(nan_outputs, dtype):
    gen = torch.Generator().manual_seed(3)
    x, scores = _inputs(gen, dtype, d=40, device=DEVICE)
    out = TRITON_OPS["fuse_tokens"](x, scores, N - 1, 1)
    assert torch.equal(out[:, :-1], x) and torch.equal(out[:, -1], torch.zeros_like(out[:, -1]))
    g = torch.randn(out.shape, generator=gen).to(dtype).to(DEVICE)
    assert torch.equal(grads(out, [x], g)[0], g[:, :-1])


def test_triton_rows_longer_than_one_tile(monkeypatch, nan_outputs):
    # N = 1 + 23 tokens in tiles of 16, D = 40 channels in blocks of 16: the running output slot and the
    # tie count carry across tiles, and every channel block recomputes the same selection.
    monkeypatch.setattr(triton_fuse, "_MAX_BLOCK_N", 16)
    monkeypatch.setattr(triton_fuse, "_MAX_BLOCK_D", 16)
    gen = torch.Generator().manual_seed(4)
    for ties, keep in ((True, 11), (False, 17)):
        x, scores = _inputs(gen, n=24, d=40, ties=ties, device=DEVICE)
        _check_triton(x, scores, keep, 1, gen)


def test_triton_non_contiguous_inputs_and_low_precision_scores(nan_outputs):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, B, D, generator=gen).to(DEVICE).transpose(0, 1).requires_grad_()
    scores = torch.rand(N, B, generator=gen).to(DEVICE).t()
    assert not (x.is_contiguous() or scores.is_contiguous())
    _check_triton(x, scores, 6, 1, gen)
    _check_triton(x, scores.half(), 6, 1, gen)


@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float32])
def test_triton_refuses_float64_and_the_reference_runs(nan_outputs, triton_forced, x_dtype):
    """float64 scores as float32 keys could merge distinct scores: a call with float64 tokens or scores is
    a float64 call, which the triton backend declares it does not take."""
    gen = torch.Generator().manual_seed(6)
    x, scores = _inputs(gen, x_dtype, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="fuse_tokens falls back to the reference backend .*float64"):
        got = ops.fuse_tokens(x, scores.double(), 4, 1)
    assert torch.equal(got, REFERENCE_OPS["fuse_tokens"](x, scores.double(), 4, 1))


def test_public_op_uses_triton(triton_forced, nan_outputs, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    x, scores = _inputs(gen, device=DEVICE)
    calls = []
    real = triton_fuse._fuse_fwd_kernel
    monkeypatch.setattr(triton_fuse, "_fuse_fwd_kernel", _Recording(real, calls))
    got, want = ops.fuse_tokens(x, scores, 5), REFERENCE_OPS["fuse_tokens"](x, scores, 5, 1)
    assert torch.equal(got[:, :-1], want[:, :-1])
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-6, rtol=1e-6)
    assert len(calls) == 1


class _Recording:
    """Stands in for a Triton kernel: records each launch, then launches the real kernel (or refuses)."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        if self.kernel is None:
            raise AssertionError("a kernel was launched for invalid arguments")
        return self.kernel[grid]


# ---------------------------------------------------------------------------------------- bad inputs
def _x(*shape, **kw):
    return torch.randn(*(shape or (B, N, D)), **kw)


BAD_CALLS = {
    "x rank": (lambda: ops.fuse_tokens(_x(N, D), torch.rand(B, N), 3), ValueError, "x"),
    "x dtype": (lambda: ops.fuse_tokens(torch.ones(B, N, D, dtype=torch.int32), torch.rand(B, N), 3), TypeError,
                "x"),
    "x not a tensor": (lambda: ops.fuse_tokens([[0.0]], torch.rand(B, N), 3), TypeError, "x"),
    "scores shape": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N - 1), 3), ValueError, "scores"),
    "scores batch": (lambda: ops.fuse_tokens(_x(), torch.rand(B + 1, N), 3), ValueError, "scores"),
    "scores rank": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N, 1), 3), ValueError, "scores"),
    "scores dtype": (lambda: ops.fuse_tokens(_x(), torch.ones(B, N, dtype=torch.int64), 3), TypeError, "scores"),
    "scores device": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N, device="meta"), 3), ValueError, "scores"),
    "keep zero": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N), 0), ValueError, "keep"),
    "keep too many": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N), N), ValueError, "keep"),
    "keep too many with prefix": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N), N - 2, 3), ValueError, "keep"),
    "keep float": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N), 3.0), ValueError, "keep"),
    "keep bool": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N), True), ValueError, "keep"),
    "num_prefix negative": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N), 3, -1), ValueError, "num_prefix"),
    "num_prefix float": (lambda: ops.fuse_tokens(_x(), torch.rand(B, N), 3, 1.0), ValueError, "num_prefix"),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_naming_the_argument_before_any_launch(monkeypatch, backend, case):
    launches = []
    monkeypatch.setattr(triton_fuse, "_fuse_fwd_kernel", _Recording(None, launches))
    alast_kernels.set_backend(backend)
    try:
        call, error, name = BAD_CALLS[case]
        with pytest.raises(error, match=f"^{name}:"):
            call()
    finally:
        alast_kernels.set_backend("auto")
    assert not launches


def test_cpu_tensors_without_the_interpreter_run_the_reference(monkeypatch, triton_forced):
    if DEVICE.type != "cpu":
        pytest.skip("CPU tensors on a GPU machine run the reference by design")
    monkeypatch.delenv("TRITON_INTERPRET")
    x, scores = _inputs(torch.Generator().manual_seed(9))
    with pytest.warns(RuntimeWarning, match="triton: CPU tensors run only under the Triton interpreter"):
        got = ops.fuse_tokens(x, scores, 3)
    assert torch.equal(got, REFERENCE_OPS["fuse_tokens"](x, scores, 3, 1))


# ------------------------------------------------------------------------------------------------ GPU
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_vit_base_shapes(nan_outputs, dtype):
    gen = torch.Generator().manual_seed(8)
    x, scores = _inputs(gen, dtype, b=16, n=197, d=768, device="cuda")
    got = TRITON_OPS["fuse_tokens"](x, scores, 138, 1)
    want = REFERENCE_OPS["fuse_tokens"](x, scores, 138, 1)
    x64 = x.detach().double().requires_grad_()
    exact = REFERENCE_OPS["fuse_tokens"](x64, scores.double(), 138, 1)
    assert torch.equal(got[:, :-1], want[:, :-1])
    assert_flash_rule("fused", got[:, -1], want[:, -1], exact[:, -1], slack=1e-5)
    g = torch.randn_like(want)
    for a, r, e in zip(grads(got, [x], g), grads(want, [x], g), grads(exact, [x64], g.double())):
        assert_flash_rule("grad_x", a, r, e, slack=1e-5)
