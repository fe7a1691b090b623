"""Triton budget-masked MLP (cuBLAS matmuls + GELU kernels) against the reference; what it saves."""
import pytest
import torch

from alast_kernels import ops
from triton_testing import (DEVICE, DTYPES, REFERENCE_OPS, TRITON_OPS, assert_flash_rule, grads,  # noqa: F401
                            nan_outputs, requires_gpu, triton_forced)

D, F, DOUT = 24, 40, 20  # none a power of two


def _inputs(dtype, gen, bias=True, shape=(2, 7)):
    def leaf(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(dtype).to(DEVICE).requires_grad_()
    x = leaf(*shape, D, scale=2.0)  # wide enough to reach GELU's curved part and its tails
    return [x, leaf(F, D, scale=D ** -0.5), leaf(F) if bias else None, leaf(DOUT, F, scale=F ** -0.5),
            leaf(DOUT) if bias else None]


def _forward_backward(ops_table, args, train, approximate, g):
    y = ops_table["masked_mlp"](*args, train, approximate)
    live = [t for t in args if t is not None]
    return y, dict(zip([id(t) for t in live], grads(y, live, g)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(nan_outputs, dtype, train, approximate):
    gen = torch.Generator().manual_seed(5 + train)
    args = _inputs(dtype, gen, bias=train or approximate == "none")
    g = torch.randn(2, 7, DOUT, generator=gen).to(dtype).to(DEVICE)
    y, got = _forward_backward(TRITON_OPS, args, train, approximate, g)
    ref_y, want = _forward_backward(REFERENCE_OPS, args, train, approximate, g)
    assert y.dtype == dtype and y.shape == (2, 7, DOUT)
    for t in args[1:]:
        if t is not None:
            assert (got[id(t)] is None) == (not train), "frozen: no parameter gradients; trained: all"
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
        for key, r in want.items():
            if r is not None:
                torch.testing.assert_close(got[key], r, rtol=1e-5, atol=1e-5)
        return
    args64 = [None if t is None else t.detach().double().requires_grad_() for t in args]
    exact_y, exact = _forward_backward(REFERENCE_OPS, args64, train, approximate, g.double())
    assert_flash_rule("y", y, ref_y, exact_y, slack=1e-3)
    for t, t64 in zip(args, args64):
        if t is not None and want[id(t)] is not None:
            assert_flash_rule("grad", got[id(t)], want[id(t)], exact[id(t64)], slack=1e-3)


@pytest.mark.parametrize("train", [True, False])
def test_saved_tensors(train):
    """Frozen: the input is not saved; never the GELU output (recomputed in backward)."""
    gen = torch.Generator().manual_seed(9)
    x, w1, b1, w2, b2 = _inputs(torch.float32, gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = TRITON_OPS["masked_mlp"](x, w1, b1, w2, b2, train, "none")
    hidden = [t for t in saved if t.numel() == 2 * 7 * F and t.shape[-1] == F]  # (2, 7, F) or (14, F)
    assert len(hidden) == 1, "only fc1's output is saved of the hidden activations"
    assert any(t.data_ptr() == x.data_ptr() for t in saved) == train
    y.sum().backward()
    assert (w1.grad is None) == (not train) and x.grad is not None


def test_linear_and_public_ops(triton_forced, nan_outputs):
    gen = torch.Generator().manual_seed(10)
    x, w1, b1, w2, b2 = _inputs(torch.float32, gen)
    torch.testing.assert_close(ops.masked_mlp(x, w1, b1, w2, b2, train=False),
                               REFERENCE_OPS["masked_mlp"](x, w1, b1, w2, b2, False, "none"), rtol=1e-5, atol=1e-5)
    y = ops.masked_linear(x, w1, b1, train=False)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w1, b1))
    y.sum().backward()
    assert w1.grad is None and b1.grad is None and x.grad is not None
    with pytest.raises(ValueError, match="approximate"):
        ops.masked_mlp(x, w1, b1, w2, b2, approximate="sigmoid")


@requires_gpu
@pytest.mark.parametrize("train", [True, False])
def test_gpu_autocast_bfloat16(train):
    gen = torch.Generator().manual_seed(11)
    args = _inputs(torch.float32, gen, shape=(64, 197))
    g = torch.randn(64, 197, DOUT, generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, got = _forward_backward(TRITON_OPS, args, train, "tanh", g)
        ref_y, want = _forward_backward(REFERENCE_OPS, args, train, "tanh", g)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref_y, rtol=2e-2, atol=2e-2)
    for key, r in want.items():
        if r is not None:
            assert got[key].dtype == r.dtype
            torch.testing.assert_close(got[key], r, rtol=2e-2, atol=2e-2)
