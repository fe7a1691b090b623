"""``ops.query_attention``: the reference against a naive float64 derivation and gradcheck, the Triton
kernel under the interpreter against both, argument checks and fallbacks."""
import pytest
import torch
import torch.nn.functional as F

import _naive
from alast_kernels import backend, ops
from triton_testing import (DEVICE, REFERENCE_OPS, TRITON_OPS, assert_flash_rule, grads, max_error,  # noqa: F401
                            nan_outputs, requires_gpu, triton_forced)


def _inputs(B, H, Tq, Nk, Dh, dtype, seed, kv_grad=False, device=DEVICE):
    """q as its own tensor; k and v as SynQT passes them: strided views of one (B, 2, H, Nk, Dh) buffer."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, Dh, generator=gen).to(dtype).to(device).requires_grad_()
    kv = torch.randn(B, 2, H, Nk, Dh, generator=gen).to(dtype).to(device).requires_grad_(kv_grad)
    g = torch.randn(B, H, Tq, Dh, generator=gen).to(dtype).to(device)
    return q, kv[:, 0], kv[:, 1], g


def _naive_out_and_grads(q, k, v, scale, g, kv_grad):
    """The float64 oracle: explicit products and softmax (tests/_naive.py), differentiated by autograd."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    logits = (q64.unsqueeze(-2) * k64.unsqueeze(-3)).sum(-1) * scale  # (B, H, Tq, Nk)
    out = (_naive.softmax(logits).unsqueeze(-1) * v64.unsqueeze(-3)).sum(-2)
    inputs = [q64, k64, v64] if kv_grad else [q64]
    return out.detach(), torch.autograd.grad(out, inputs, g.double())


# --------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.float16, 3e-3),
                                        (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kv_grad", [False, True])
def test_reference_against_naive(reference_backend, dtype, tol, kv_grad):
    q, k, v, g = _inputs(2, 3, 4, 38, 24, dtype, seed=1, kv_grad=kv_grad, device="cpu")  # Nk = 1 + 37
    scale = 0.3
    out = ops.query_attention(q, k, v, scale=scale)
    assert out.shape == (2, 3, 4, 24) and out.dtype == dtype
    exact, exact_grads = _naive_out_and_grads(q, k, v, scale, g, kv_grad)
    assert max_error(out, exact) <= tol
    inputs = [q, k, v] if kv_grad else [q]
    got = torch.autograd.grad(out, inputs, g)
    for a, e in zip(got, exact_grads):
        assert max_error(a, e) <= tol * max(1.0, e.abs().max().item())


def test_reference_gradient_to_queries_only(reference_backend):
    q, k, v, g = _inputs(1, 2, 3, 14, 8, torch.float32, seed=2, device="cpu")
    ops.query_attention(q, k, v).backward(g)
    assert q.grad is not None and not k.requires_grad and not v.requires_grad


def test_reference_default_scale(reference_backend):
    q, k, v, _ = _inputs(1, 2, 3, 14, 24, torch.float64, seed=3, device="cpu")
    torch.testing.assert_close(ops.query_attention(q, k, v), _naive.attention(q, k, v, 24 ** -0.5)[0])


@pytest.mark.parametrize("kv_grad", [False, True])
def test_reference_gradcheck(reference_backend, kv_grad):
    q, k, v, _ = _inputs(1, 2, 3, 12, 5, torch.float64, seed=4, kv_grad=kv_grad, device="cpu")
    if kv_grad:
        k, v = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: ops.query_attention(*t, scale=0.7), (q, k, v))


# ------------------------------------------------------------------------------------------ triton
CASES = [  # (dtype, B, H, Tq, Nk, Dh): Nk = 1 + prime, head dims powers of two and not
    (torch.float32, 2, 2, 4, 38, 32), (torch.float32, 1, 3, 1, 14, 24), (torch.float32, 1, 2, 17, 24, 64),
    (torch.float32, 1, 1, 16, 198, 80),
    (torch.float16, 2, 2, 4, 38, 32), (torch.float16, 1, 2, 5, 30, 48),
]


@pytest.mark.parametrize("kv_grad", [False, True])
@pytest.mark.parametrize("dtype, B, H, Tq, Nk, Dh", CASES)
def test_triton_against_reference(nan_outputs, dtype, B, H, Tq, Nk, Dh, kv_grad):
    q, k, v, g = _inputs(B, H, Tq, Nk, Dh, dtype, seed=Tq * 1000 + Nk + Dh, kv_grad=kv_grad)
    scale = Dh ** -0.5
    inputs = [q, k, v] if kv_grad else [q]
    out = TRITON_OPS["query_attention"](q, k, v, scale)
    assert out.shape == (B, H, Tq, Dh) and out.dtype == dtype
    got = grads(out, inputs, g)
    ref = REFERENCE_OPS["query_attention"](q, k, v, scale)
    ref_grads = grads(ref, inputs, g)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(got, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        return
    exact, exact_grads = _naive_out_and_grads(q, k, v, scale, g, kv_grad)
    assert_flash_rule("out", out, ref, exact, slack=1e-4)
    for name, a, r, e in zip("qkv", got, ref_grads, exact_grads):
        assert_flash_rule(f"grad_{name}", a, r, e, slack=1e-4)


def test_triton_frozen_keys_get_no_gradient(nan_outputs):
    q, k, v, g = _inputs(1, 2, 4, 38, 32, torch.float32, seed=5)
    TRITON_OPS["query_attention"](q, k, v, 0.2).backward(g)
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert k.grad is None and v.grad is None


def test_triton_public_op_and_layout(triton_forced, nan_outputs):
    q, k, v, _ = _inputs(2, 2, 4, 14, 32, torch.float32, seed=6)
    out = ops.query_attention(q, k, v)
    torch.testing.assert_close(out, REFERENCE_OPS["query_attention"](q, k, v, 32 ** -0.5), rtol=1e-5, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous()  # merging the heads back, (B, Tq, H·Dh), is a view


@pytest.mark.parametrize("Tq, Dh, what", [(129, 8, "129 queries > 128"), (2, 160, "head dim 160 > 128")])
def test_triton_declines_beyond_its_tile_and_the_reference_runs(triton_forced, Tq, Dh, what):
    q, k, v, _ = _inputs(1, 1, Tq, 6, Dh, torch.float32, seed=7)
    with pytest.warns(RuntimeWarning, match=f"query_attention falls back to the reference backend .*{what}"):
        got = ops.query_attention(q, k, v, 0.1)
    torch.testing.assert_close(got, REFERENCE_OPS["query_attention"](q, k, v, 0.1), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ bad arguments
@pytest.fixture
def no_launch(monkeypatch):
    """Any backend implementation reached fails the test: the checks must stop bad inputs before it."""
    def launched(*args):
        raise AssertionError("an implementation ran for arguments the checks should have rejected")
    monkeypatch.setattr(backend, "implementation", lambda *args, **facts: launched)


def test_bad_arguments_named_before_launch(no_launch):
    q = torch.randn(1, 2, 3, 8)
    kv = torch.randn(1, 2, 10, 8)
    cases = [
        (TypeError, "q", (q.long(), kv, kv), {}),
        (ValueError, "q", (q[0], kv, kv), {}),
        (TypeError, "k", (q, kv.double(), kv), {}),
        (TypeError, "v", (q, kv, kv.half()), {}),
        (ValueError, "k", (q, torch.randn(1, 3, 10, 8), kv), {}),
        (ValueError, "k", (q, torch.randn(1, 2, 10, 4), kv), {}),
        (ValueError, "v", (q, kv, torch.randn(1, 2, 9, 8)), {}),
        (ValueError, "q, k", (q[:, :, :0], kv, kv), {}),
        (ValueError, "q, k", (q, kv[:, :, :0], kv[:, :, :0]), {}),
        (ValueError, "scale", (q, kv, kv), {"scale": 0.0}),
        (ValueError, "scale", (q, kv, kv), {"scale": float("nan")}),
        (ValueError, "scale", (q, kv, kv), {"scale": True}),
        (TypeError, "k", (q, "keys", kv), {}),
    ]
    for error, name, args, kwargs in cases:
        with pytest.raises(error, match=f"^{name}:"):
            ops.query_attention(*args, **kwargs)


def test_cpu_tensors_without_the_interpreter_run_the_reference(monkeypatch, triton_forced):
    if DEVICE.type != "cpu":
        pytest.skip("CPU tensors on a GPU machine run the reference by design")
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v, _ = _inputs(1, 1, 2, 6, 8, torch.float32, seed=8)
    with pytest.warns(RuntimeWarning, match="triton: CPU tensors run only under the Triton interpreter"):
        got = ops.query_attention(q, k, v, 1.0)
    torch.testing.assert_close(got, REFERENCE_OPS["query_attention"](q, k, v, 1.0), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ GPU
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, H, Tq, Nk, Dh", [(64, 12, 4, 197, 64), (32, 6, 16, 197, 64), (8, 16, 1, 1025, 80),
                                              (4, 12, 64, 577, 128)])
@pytest.mark.parametrize("kv_grad", [False, True])
def test_gpu_flash_rule(nan_outputs, dtype, B, H, Tq, Nk, Dh, kv_grad):
    q, k, v, g = _inputs(B, H, Tq, Nk, Dh, dtype, seed=Nk, kv_grad=kv_grad)
    inputs = [q, k, v] if kv_grad else [q]
    scale = Dh ** -0.5
    out = TRITON_OPS["query_attention"](q, k, v, scale)
    got = grads(out, inputs, g)
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
    ref_grads = grads(ref, inputs, g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = F.scaled_dot_product_attention(q64, k64, v64, scale=scale)
    exact_grads = grads(exact, [q64, k64, v64][:len(inputs)], g.double())
    assert_flash_rule("out", out, ref, exact, slack=1e-4)
    for name, a, r, e in zip("qkv", got, ref_grads, exact_grads):
        assert_flash_rule(f"grad_{name}", a, r, e, slack=1e-4)
