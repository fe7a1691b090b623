"""Triton gather, scatter and gather + LayerNorm against the reference: values and every gradient."""
import pytest
import torch

from alast_kernels import ops
from alast_kernels.backends.triton import tokens as triton_tokens
from triton_testing import (DEVICE, DTYPES, REFERENCE_OPS, TRITON_OPS, assert_flash_rule, grads,  # noqa: F401
                            nan_outputs, requires_gpu, triton_forced)

B, N, D, K = 2, 14, 40, 6  # N = 1 + 13, D not a power of two


def _x(dtype, gen, shape=(B, N, D)):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE).requires_grad_()


def _idx(gen, unique=True, n=N, k=K, b=B):
    rows = [torch.randperm(n, generator=gen)[:k].sort().values for _ in range(b)]
    idx = torch.stack(rows).to(DEVICE)
    if not unique:
        idx[0, 1] = idx[0, 0]
        idx[-1, -1] = idx[-1, 2]
    return idx


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_repeated_indices(nan_outputs, dtype):
    gen = torch.Generator().manual_seed(1)
    x, idx = _x(dtype, gen), _idx(gen, unique=False)
    got = TRITON_OPS["gather_tokens"](x, idx)
    want = REFERENCE_OPS["gather_tokens"](x, idx)
    assert torch.equal(got, want)
    g = torch.randn(want.shape, generator=gen).to(dtype).to(DEVICE)
    (gx,), (rx,) = grads(got, [x], g), grads(want, [x], g)
    if dtype == torch.float32:
        torch.testing.assert_close(gx, rx, rtol=0, atol=1e-6)
    else:  # repeated indices: a float32 accumulator against PyTorch's float16 index_add
        exact = torch.zeros(B, N, D, dtype=torch.float64, device=DEVICE).index_put_(
            (torch.arange(B, device=DEVICE)[:, None], idx), g.double(), accumulate=True)
        assert_flash_rule("grad_x", gx, rx, exact)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter(nan_outputs, dtype):
    gen = torch.Generator().manual_seed(2)
    x, idx = _x(dtype, gen), _idx(gen)
    delta = _x(dtype, gen, (B, K, D))
    got = TRITON_OPS["scatter_tokens"](x, idx, delta)
    want = REFERENCE_OPS["scatter_tokens"](x, idx, delta)
    assert torch.equal(got, want)
    g = torch.randn(want.shape, generator=gen).to(dtype).to(DEVICE)
    for a, b in zip(grads(got, [x, delta], g), grads(want, [x, delta], g)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_gather_layer_norm(nan_outputs, dtype, affine):
    gen = torch.Generator().manual_seed(3)
    x, idx = _x(dtype, gen), _idx(gen, unique=affine != "both")
    w = _x(dtype, gen, (D,)) if affine != "none" else None
    b = _x(dtype, gen, (D,)) if affine == "both" else None
    params = [t for t in (x, w, b) if t is not None]
    got = TRITON_OPS["gather_layer_norm"](x, idx, w, b, 1e-5)
    want = REFERENCE_OPS["gather_layer_norm"](x, idx, w, b, 1e-5)
    gk, gy = (torch.randn(want[0].shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    got_grads = grads(got, params, (gk, gy))
    want_grads = grads(want, params, (gk, gy))
    assert torch.equal(got[0], want[0])
    if dtype == torch.float32:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        for a, r in zip(got_grads, want_grads):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        return
    p64 = [t.detach().double().requires_grad_() for t in params]
    x64, w64, b64 = p64[0], (p64[1] if w is not None else None), (p64[2] if b is not None else None)
    exact = REFERENCE_OPS["gather_layer_norm"](x64, idx, w64, b64, 1e-5)
    exact_grads = grads(exact, p64, (gk.double(), gy.double()))
    assert_flash_rule("layer_norm", got[1], want[1], exact[1], slack=1e-3)
    for name, a, r, e in zip(("x", "weight", "bias"), got_grads, want_grads, exact_grads):
        assert_flash_rule(f"grad_{name}", a, r, e, slack=1e-3)


def test_frozen_parameters_get_no_gradient(nan_outputs):
    gen = torch.Generator().manual_seed(4)
    x, idx = _x(torch.float32, gen), _idx(gen)
    w, b = (torch.randn(D, generator=gen).to(DEVICE) for _ in range(2))
    _, y = TRITON_OPS["gather_layer_norm"](x, idx, w, b, 1e-6)
    (gx,) = grads(y, [x], torch.ones_like(y))
    _, ry = REFERENCE_OPS["gather_layer_norm"](x, idx, w, b, 1e-6)
    (rx,) = grads(ry, [x], torch.ones_like(ry))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)


def test_rows_wider_than_one_block(monkeypatch, nan_outputs):
    monkeypatch.setattr(triton_tokens, "_MAX_BLOCK_D", 16)  # D = 40 -> three channel blocks per row
    gen = torch.Generator().manual_seed(8)
    x, idx = _x(torch.float32, gen), _idx(gen)
    delta = _x(torch.float32, gen, (B, K, D))
    got, want = TRITON_OPS["gather_tokens"](x, idx), REFERENCE_OPS["gather_tokens"](x, idx)
    assert torch.equal(got, want)
    g = torch.randn(want.shape, generator=gen).to(DEVICE)
    assert torch.equal(grads(got, [x], g)[0], grads(want, [x], g)[0])
    assert torch.equal(TRITON_OPS["scatter_tokens"](x, idx, delta), REFERENCE_OPS["scatter_tokens"](x, idx, delta))


def test_non_contiguous_inputs(nan_outputs):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, B, D, generator=gen).to(DEVICE).transpose(0, 1)
    idx = _idx(gen, k=N).t().contiguous().t()[:, :K]  # a strided view of unique indices
    delta = torch.randn(B, D, K, generator=gen).to(DEVICE).transpose(1, 2)
    assert not (x.is_contiguous() or idx.is_contiguous() or delta.is_contiguous())
    assert torch.equal(TRITON_OPS["gather_tokens"](x, idx), REFERENCE_OPS["gather_tokens"](x, idx))
    assert torch.equal(TRITON_OPS["scatter_tokens"](x, idx, delta), REFERENCE_OPS["scatter_tokens"](x, idx, delta))
    torch.testing.assert_close(TRITON_OPS["gather_layer_norm"](x, idx, None, None, 1e-6),
                               REFERENCE_OPS["gather_layer_norm"](x, idx, None, None, 1e-6), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_before_launch(triton_forced):
    x = torch.randn(B, N, D, device=DEVICE)
    idx = torch.zeros(B, K, dtype=torch.int64, device=DEVICE)
    with pytest.raises(IndexError, match="idx"):
        ops.gather_tokens(x, idx + N)
    with pytest.raises(ValueError, match="unique"):
        ops.scatter_tokens(x, idx, torch.zeros(B, K, D, device=DEVICE))
    # Without the value check (indices the caller made), their type and shape are still checked.
    with pytest.raises(TypeError, match="idx"):
        ops.gather_tokens(x, idx.int(), check_indices=False)
    with pytest.raises(ValueError, match="batch"):
        ops.gather_layer_norm(x, idx[:1], None, None, check_indices=False)
    with pytest.raises(ValueError, match="delta"):
        ops.scatter_tokens(x, idx, torch.zeros(B, K, D + 1, device=DEVICE), check_indices=False)
    with pytest.raises(ValueError, match="weight"):
        ops.gather_layer_norm(x, idx, torch.ones(D + 1, device=DEVICE), None)


def test_public_ops_use_triton(triton_forced, nan_outputs):
    gen = torch.Generator().manual_seed(6)
    x, idx = _x(torch.float32, gen), _idx(gen)
    assert torch.equal(ops.gather_tokens(x, idx), REFERENCE_OPS["gather_tokens"](x, idx))


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_vit_base_shapes(nan_outputs, dtype):
    gen = torch.Generator().manual_seed(7)
    b, n, d, k = 64, 197, 768, 99
    x = torch.randn(b, n, d, generator=gen).to(dtype).cuda().requires_grad_()
    idx = _idx(gen, n=n, k=k, b=b)
    w = torch.randn(d, generator=gen).to(dtype).cuda().requires_grad_()
    bias = torch.randn(d, generator=gen).to(dtype).cuda().requires_grad_()
    got = TRITON_OPS["gather_layer_norm"](x, idx, w, bias, 1e-6)
    want = REFERENCE_OPS["gather_layer_norm"](x, idx, w, bias, 1e-6)
    g = tuple(torch.randn_like(t) for t in want)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
    exact = REFERENCE_OPS["gather_layer_norm"](x64, idx, w64, b64, 1e-6)
    assert torch.equal(got[0], want[0])
    assert_flash_rule("layer_norm", got[1], want[1], exact[1])
    for a, r, e in zip(grads(got, [x, w, bias], g), grads(want, [x, w, bias], g),
                       grads(exact, [x64, w64, b64], tuple(t.double() for t in g))):
        assert_flash_rule("grad", a, r, e, slack=1e-2 if dtype != torch.float32 else 1e-4)
    delta = torch.randn(b, k, d, generator=gen).to(dtype).cuda()
    assert torch.equal(TRITON_OPS["scatter_tokens"](x, idx, delta), REFERENCE_OPS["scatter_tokens"](x, idx, delta))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_tensors_on_a_non_current_device(nan_outputs):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(B, N, D, generator=gen).to("cuda:1")
    idx = _idx(gen).to("cuda:1")
    with torch.cuda.device(0):
        got = TRITON_OPS["gather_layer_norm"](x, idx, None, None, 1e-6)
    for a, b in zip(got, REFERENCE_OPS["gather_layer_norm"](x, idx, None, None, 1e-6)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
