"""Triton flash attention (forward, backward, class-token row) against the reference and float64."""
import warnings

import pytest
import torch

from alast_kernels import ops
from alast_kernels.backends.reference.attention import cls_probabilities
from triton_testing import (DEVICE, REFERENCE_OPS, TRITON_OPS, assert_flash_rule, grads, nan_outputs,  # noqa: F401
                            requires_gpu, triton_forced)


def _qkv(B, H, Nq, Nk, Dh, dtype, gen):
    """q, k, v as the ViT block makes them: strided views of one (B, N, 3, H, Dh) projection."""
    if Nq == Nk:
        qkv = torch.randn(B, Nq, 3, H, Dh, generator=gen).to(dtype).to(DEVICE).requires_grad_()
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.randn(B, H, Nq, Dh, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    kv = torch.randn(B, Nk, 2, H, Dh, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    return (q, *kv.permute(2, 0, 3, 1, 4).unbind(0))


def _run(ops_table, q, k, v, scale, g):
    out, cls = ops_table["attention"](q, k, v, scale, True)
    return out, cls, grads(out, [q, k, v], g)


CASES = [  # (dtype, B, H, Nq, Nk, Dh): token counts 1 + prime, every supported head dim
    (torch.float32, 2, 2, 14, 14, 32), (torch.float32, 1, 2, 14, 14, 64), (torch.float32, 1, 3, 18, 18, 80),
    (torch.float32, 1, 1, 12, 12, 96), (torch.float32, 1, 1, 6, 6, 128), (torch.float32, 1, 2, 14, 38, 64),
    (torch.float16, 2, 2, 14, 14, 32), (torch.float16, 1, 3, 18, 18, 80), (torch.float16, 1, 2, 38, 14, 64),
]


@pytest.mark.parametrize("dtype, B, H, Nq, Nk, Dh", CASES)
def test_forward_backward(nan_outputs, dtype, B, H, Nq, Nk, Dh):
    gen = torch.Generator().manual_seed(Nq * 100 + Dh)
    q, k, v = _qkv(B, H, Nq, Nk, Dh, dtype, gen)
    scale = Dh ** -0.5
    g = torch.randn(B, H, Nq, Dh, generator=gen).to(dtype).to(DEVICE)
    out, cls, got_grads = _run(TRITON_OPS, q, k, v, scale, g)
    assert out.shape == (B, H, Nq, Dh) and out.dtype == dtype
    assert cls.shape == (B, Nk) and cls.dtype == torch.float32 and not cls.requires_grad
    torch.testing.assert_close(cls, cls_probabilities(q, k, scale), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls.sum(1), torch.ones(B, device=DEVICE))
    ref_out, _, ref_grads = _run(REFERENCE_OPS, q, k, v, scale, g)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for a, r in zip(got_grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        return
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = REFERENCE_OPS["attention"](q64, k64, v64, scale, False)
    exact_grads = grads(exact, [q64, k64, v64], g.double())
    assert_flash_rule("out", out, ref_out, exact, slack=1e-4)
    for name, a, r, e in zip("qkv", got_grads, ref_grads, exact_grads):
        assert_flash_rule(f"grad_{name}", a, r, e, slack=1e-4)


def test_without_cls_and_public_op(triton_forced, nan_outputs):
    gen = torch.Generator().manual_seed(11)
    q, k, v = _qkv(1, 2, 14, 14, 32, torch.float32, gen)
    out = ops.attention(q, k, v)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, REFERENCE_OPS["attention"](q, k, v, 32 ** -0.5, False), rtol=1e-5, atol=1e-5)
    # The output's memory is (B, N, H, Dh): the block's transpose(1, 2).reshape is a view, not a copy.
    assert out.transpose(1, 2).is_contiguous()


def test_head_dims_above_128_run_the_reference_with_one_warning(triton_forced):
    """The backend declares head dims up to 128: the dispatcher runs the reference for 160 and says why."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = _qkv(1, 1, 6, 6, 160, torch.float32, gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [ops.attention(q, k, v, 0.1, return_cls=True) for _ in range(2)][-1]
    (message,) = [str(w.message) for w in caught]
    assert "attention falls back to the reference backend" in message and "head dim 160 > 128" in message
    want = REFERENCE_OPS["attention"](q, k, v, 0.1, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_raise_before_any_backend_runs(triton_forced):
    q = torch.randn(1, 2, 6, 32, device=DEVICE)
    with pytest.raises(TypeError, match="k"):
        ops.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="v"):
        ops.attention(q, q, q[..., :16])
    with pytest.raises(TypeError, match="v"):
        ops.attention(q, q, q.half())
    with pytest.raises(ValueError, match="k"):
        ops.attention(q, q[:, :1], q)
    with pytest.raises(ValueError, match="at least one query, key and channel"):
        ops.attention(q, q[:, :, :0], q[:, :, :0])
    with pytest.raises(ValueError, match="^scale:"):
        ops.attention(q, q, q, scale=-1.0)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, H, N, Dh", [(32, 12, 197, 64), (8, 16, 99, 80), (4, 6, 1031, 96), (2, 4, 4097, 128),
                                         (16, 12, 50, 32)])
def test_gpu_flash_rule(nan_outputs, dtype, B, H, N, Dh):
    gen = torch.Generator().manual_seed(N)
    q, k, v = _qkv(B, H, N, N, Dh, dtype, gen)
    scale = Dh ** -0.5
    g = torch.randn(B, H, N, Dh, generator=gen).to(dtype).cuda()
    out, cls = TRITON_OPS["attention"](q, k, v, scale, True)
    got_grads = grads(out, [q, k, v], g)
    ref = REFERENCE_OPS["attention"](q, k, v, scale, False)
    ref_grads = grads(ref, [q, k, v], g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = REFERENCE_OPS["attention"](q64, k64, v64, scale, False)
    exact_grads = grads(exact, [q64, k64, v64], g.double())
    assert_flash_rule("out", out, ref, exact, slack=1e-4)
    for name, a, r, e in zip("qkv", got_grads, ref_grads, exact_grads):
        assert_flash_rule(f"grad_{name}", a, r, e, slack=1e-4)
    torch.testing.assert_close(cls, cls_probabilities(q, k, scale), rtol=1e-4, atol=1e-6)
