"""Triton class-token scores (one read of x, no key projection) against the reference."""
import pytest
import torch
import torch.nn as nn

from alast_kernels import ops
from alast_kernels.backends.triton import scores as triton_scores
from triton_testing import (DEVICE, DTYPES, REFERENCE_OPS, TRITON_OPS, nan_outputs, requires_gpu,  # noqa: F401
                            triton_forced)


def _block_params(D, dtype, gen, bias=True, norm_affine=True):
    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype).to(DEVICE)
    return dict(
        norm_weight=rnd(D, s=0.5) + 1 if norm_affine else None,
        norm_bias=rnd(D, s=0.1) if norm_affine else None,
        qkv_weight=rnd(3 * D, D, s=D ** -0.5),
        qkv_bias=rnd(3 * D, s=0.1) if bias else None,
    )


def _both(x, p, H, q_norm=None, k_norm=None, eps=1e-6):
    args = (x, p["norm_weight"], p["norm_bias"], p["qkv_weight"], p["qkv_bias"], H, eps, (x.shape[2] // H) ** -0.5,
            q_norm, k_norm)
    return TRITON_OPS["cls_scores"](*args), REFERENCE_OPS["cls_scores"](*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, D, H, bias, affine", [(14, 48, 3, True, True), (38, 40, 2, False, False)])
def test_matches_reference(nan_outputs, dtype, N, D, H, bias, affine):
    gen = torch.Generator().manual_seed(N + D)
    x = (torch.randn(2, N, D, generator=gen) * 2 + 0.3).to(dtype).to(DEVICE)
    got, want = _both(x, _block_params(D, dtype, gen, bias, affine), H)
    assert got.dtype == torch.float32 and got.shape == (2, N)
    # Both compute in float32 from the same inputs; only the order of the float32 sums differs.
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(1), torch.ones(2, device=DEVICE))


def test_float32_under_autocast(nan_outputs):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 14, 48, generator=gen).to(DEVICE)
    p = _block_params(48, torch.float32, gen)
    plain, _ = _both(x, p, 3)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        under_autocast, _ = _both(x, p, 3)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


def test_many_token_blocks(monkeypatch, nan_outputs):
    # One token per program: 70 blocks of per-head statistics, combined in two chunks of 64.
    monkeypatch.setattr(triton_scores, "_TILE", 64)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 70, 40, generator=gen).to(DEVICE)
    got, want = _both(x, _block_params(40, torch.float32, gen), 2)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)


def test_q_norm_and_k_norm(nan_outputs, triton_forced):
    gen = torch.Generator().manual_seed(8)
    D, H = 48, 3
    x = torch.randn(2, 14, D, generator=gen).to(DEVICE)
    p = _block_params(D, torch.float32, gen)
    q_norm, k_norm = nn.LayerNorm(D // H).to(DEVICE), nn.LayerNorm(D // H).to(DEVICE)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5, generator=gen)
        k_norm.weight.uniform_(0.5, 1.5, generator=gen)
    got, want = _both(x, p, H, q_norm=q_norm)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
    # A k_norm breaks the identity: the backend declares it cannot, the dispatcher projects the keys.
    args = (p["norm_weight"], p["norm_bias"], p["qkv_weight"], p["qkv_bias"], H)
    with pytest.warns(RuntimeWarning, match="cls_scores falls back to the reference backend .*k_norm"):
        got = ops.cls_scores(x, *args, q_norm=q_norm, k_norm=k_norm)
    want = REFERENCE_OPS["cls_scores"](x, *args, 1e-6, (D // H) ** -0.5, q_norm, k_norm)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_public_op_no_grad_and_bad_inputs(triton_forced, nan_outputs):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 14, 48, generator=gen).to(DEVICE).requires_grad_()
    p = _block_params(48, torch.float32, gen)
    got = ops.cls_scores(x, p["norm_weight"], p["norm_bias"], p["qkv_weight"], p["qkv_bias"], 3)
    assert not got.requires_grad
    torch.testing.assert_close(got, _both(x, p, 3)[1], rtol=2e-5, atol=1e-7)
    with pytest.raises(ValueError, match="num_heads"):
        ops.cls_scores(x, None, None, p["qkv_weight"], None, 5)
    with pytest.raises(ValueError, match="qkv_weight"):
        ops.cls_scores(x, None, None, p["qkv_weight"][:-1], None, 3)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, D, H", [(197, 768, 12), (4097, 384, 6), (257, 1024, 16)])
def test_gpu_vit_shapes(nan_outputs, dtype, N, D, H):
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(8, N, D, generator=gen).to(dtype).cuda()
    got, want = _both(x, _block_params(D, dtype, gen), H)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
