"""The reference backend's ops against naive float64 re-derivations (tests/_naive.py), gradcheck, and
every argument check of :mod:`alast_kernels.ops`.

Odd sizes throughout: ``N = 1 + 13`` tokens, ``D = 30`` channels in 3 heads of 10.
"""
import contextlib

import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp

import _naive as naive
from alast_kernels import ops
from conftest import requires_gpu


B, N, D, H = 2, 14, 30, 3
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) against the float64 derivation from the same (rounded) inputs: a few units of each
# dtype's rounding error on O(1) values.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


pytestmark = pytest.mark.usefixtures("reference_backend")


def rand(*shape, dtype=torch.float64, scale=1.0, requires_grad=False, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    t = (torch.randn(*shape, dtype=torch.float64, generator=g) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def random_indices(B, N, K, unique=True, low=0):
    rows = []
    for _ in range(B):
        if unique:
            rows.append(torch.randperm(N - low)[:K] + low)
        else:
            rows.append(torch.randint(low, N, (K,)))
    return torch.stack(rows).to(torch.int64)


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------ select_tokens
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_prefix,keep", [(1, 1), (1, 6), (1, 13), (5, 4), (0, 7)])
def test_select_tokens_matches_naive(dtype, num_prefix, keep):
    scores = torch.rand(3, N, dtype=torch.float64).to(dtype)
    idx = ops.select_tokens(scores, keep, num_prefix)
    assert idx.dtype == torch.int64 and idx.shape == (3, num_prefix + keep)
    assert torch.equal(idx, naive.select_tokens(scores.double(), keep, num_prefix))


def test_select_tokens_prefix_first_ascending_and_ties_to_lower_index():
    # Non-prefix tokens 1..9 with many equal scores; the prefix scores are low but always kept.
    scores = torch.tensor([[0.0, 0.5, 0.9, 0.5, 0.9, 0.1, 0.5, 0.9, 0.5, 0.2],
                           [9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    idx = ops.select_tokens(scores, 5, 1)
    # Row 0: the three 0.9s (2, 4, 7), then the two lowest-index 0.5s (1, 3); row 1: all tied.
    assert idx.tolist() == [[0, 1, 2, 3, 4, 7], [0, 1, 2, 3, 4, 5]]
    assert bool((idx[:, 1:] > idx[:, :-1]).all())


def test_select_tokens_keep_all_is_every_token_in_order():
    scores = torch.rand(2, N)
    assert torch.equal(ops.select_tokens(scores, N - 1, 1), torch.arange(N).expand(2, N))
    assert torch.equal(ops.select_tokens(scores, N - 4, 4), torch.arange(N).expand(2, N))


def test_select_tokens_several_prefix_tokens_always_kept():
    scores = torch.rand(4, N)
    scores[:, :5] = -1.0  # the worst scores: a selection that looked at them would drop them
    idx = ops.select_tokens(scores, 3, 5)
    assert torch.equal(idx[:, :5], torch.arange(5).expand(4, 5))
    assert bool((idx[:, 5:] >= 5).all())


# --------------------------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_tokens_matches_naive(dtype):
    x = rand(B, N, D, dtype=dtype)
    idx = random_indices(B, N, 9, unique=False)
    out = ops.gather_tokens(x, idx)
    assert out.dtype == dtype and out.shape == (B, 9, D)
    assert torch.equal(out.double(), naive.gather_tokens(x, idx))  # a copy: exact in every dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_tokens_matches_naive_and_leaves_x_alone(dtype):
    x = rand(B, N, D, dtype=dtype)
    x_before = x.clone()
    idx = random_indices(B, N, 9)
    delta = rand(B, 9, D, dtype=dtype)
    out = ops.scatter_tokens(x, idx, delta)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(x, x_before)
    assert_close(out, naive.scatter_tokens(x, idx, delta), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_gather_layer_norm_matches_naive(dtype, affine):
    x = rand(B, N, D, dtype=dtype, scale=2.0) + 0.5
    idx = random_indices(B, N, 8)
    w = rand(D, dtype=dtype) if affine else None
    b = rand(D, dtype=dtype) if affine else None
    x_kept, y = ops.gather_layer_norm(x, idx, w, b, 1e-5)
    assert x_kept.dtype == y.dtype == dtype and y.shape == (B, 8, D)
    assert torch.equal(x_kept.double(), naive.gather_tokens(x, idx))
    assert_close(y, naive.layer_norm(naive.gather_tokens(x, idx), w, b, 1e-5), dtype)


def test_gather_backward_accumulates_repeated_indices():
    x = rand(1, 5, 3, requires_grad=True)
    idx = torch.tensor([[4, 1, 4, 4]])
    g = rand(1, 4, 3)
    ops.gather_tokens(x, idx).backward(g)
    expected = torch.zeros(1, 5, 3, dtype=torch.float64)
    expected[0, 1] = g[0, 1]
    expected[0, 4] = g[0, 0] + g[0, 2] + g[0, 3]
    torch.testing.assert_close(x.grad, expected, atol=1e-12, rtol=0)


def test_scatter_backward_contract():
    x = rand(B, N, D, requires_grad=True)
    idx = random_indices(B, N, 5)
    delta = rand(B, 5, D, requires_grad=True)
    g = rand(B, N, D)
    ops.scatter_tokens(x, idx, delta).backward(g)
    assert torch.equal(x.grad, g)
    assert torch.equal(delta.grad, naive.gather_tokens(g, idx))


def test_gradcheck_gather_scatter_gather_layer_norm():
    x = rand(2, 7, 3, requires_grad=True)
    idx_rep = torch.tensor([[0, 3, 3, 6], [5, 1, 2, 1]])
    idx = torch.tensor([[0, 3, 6, 2], [5, 1, 2, 4]])
    delta = rand(2, 4, 3, requires_grad=True)
    w, b = rand(3, requires_grad=True), rand(3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.gather_tokens(t, idx_rep), (x,))
    assert torch.autograd.gradcheck(lambda t, d: ops.scatter_tokens(t, idx, d), (x, delta))
    assert torch.autograd.gradcheck(lambda t, w, b: ops.gather_layer_norm(t, idx_rep, w, b, 1e-5), (x, w, b))


# ---------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq", [N, 5])
def test_attention_matches_naive(dtype, nq):
    q, k, v = rand(B, H, nq, 10, dtype=dtype), rand(B, H, N, 10, dtype=dtype), rand(B, H, N, 10, dtype=dtype)
    out, cls = ops.attention(q, k, v, return_cls=True)
    ref_out, ref_cls = naive.attention(q, k, v, 10 ** -0.5)
    assert out.dtype == dtype and out.shape == (B, H, nq, 10)
    assert_close(out, ref_out, dtype)
    # The class row is computed in float32 (float64 for float64 inputs), whatever the input precision.
    assert cls.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and cls.shape == (B, N)
    assert_close(cls, ref_cls, torch.float64 if dtype == torch.float64 else torch.float32)
    assert not cls.requires_grad
    torch.testing.assert_close(cls.sum(-1).double(), torch.ones(B, dtype=torch.float64))
    # Without return_cls: just the output, identical.
    assert torch.equal(ops.attention(q, k, v), out)


def test_attention_explicit_scale_and_no_grad_on_cls_row():
    q, k, v = (rand(B, H, N, 10, requires_grad=True) for _ in range(3))
    out, cls = ops.attention(q, k, v, scale=0.37, return_cls=True)
    ref_out, ref_cls = naive.attention(q, k, v, 0.37)
    assert_close(out, ref_out, torch.float64)
    assert_close(cls, ref_cls, torch.float64)
    assert out.requires_grad and cls.grad_fn is None


def test_gradcheck_attention():
    # Tiny: every gradcheck evaluation is a full attention call.
    q, k, v = rand(1, 2, 3, 2, requires_grad=True), rand(1, 2, 4, 2, requires_grad=True), \
        rand(1, 2, 4, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, scale=0.8, return_cls=True)[0],
                                    (q, k, v))


# --------------------------------------------------------------------------------------- cls_scores
def _head_norm():
    norm = nn.LayerNorm(10, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(10))
        norm.bias.copy_(0.3 * torch.randn(10))
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_cls_scores_match_explicit_key_projection(dtype, qkv_bias, qk_norm):
    x = rand(B, N, D, dtype=dtype, scale=2.0)
    nw, nb = 1 + 0.2 * rand(D, dtype=dtype), 0.2 * rand(D, dtype=dtype)
    w = rand(3 * D, D, dtype=dtype, scale=D ** -0.5)
    b = rand(3 * D, dtype=dtype) if qkv_bias else None
    q_norm = k_norm = None
    naive_q = naive_k = None
    if qk_norm:
        qn, kn = _head_norm().to(dtype), _head_norm().to(dtype)
        q_norm, k_norm = qn, kn
        naive_q = lambda t: naive.layer_norm(t, qn.weight, qn.bias, qn.eps)  # noqa: E731
        naive_k = lambda t: naive.layer_norm(t, kn.weight, kn.bias, kn.eps)  # noqa: E731
    s = ops.cls_scores(x, nw, nb, w, b, H, eps=1e-6, q_norm=q_norm, k_norm=k_norm)
    ref = naive.cls_scores(x, nw, nb, w, b, H, 1e-6, 10 ** -0.5, naive_q, naive_k)
    assert s.shape == (B, N)
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The input is rounded to `dtype`, the maths runs in float32 (float64): but the head norms run in
    # the input dtype, so with qk_norm a low precision input sees its rounding.
    tol_dtype = dtype if (qk_norm and dtype in (torch.float16, torch.bfloat16)) else s.dtype
    assert_close(s, ref, tol_dtype)
    torch.testing.assert_close(s.sum(-1).double(), torch.ones(B, dtype=torch.float64), atol=1e-5, rtol=0)


def test_cls_scores_carry_no_gradient_and_default_scale():
    x = rand(B, N, D, requires_grad=True)
    w = rand(3 * D, D, scale=D ** -0.5, requires_grad=True)
    s = ops.cls_scores(x, None, None, w, None, H)
    assert not s.requires_grad and s.grad_fn is None
    assert_close(s, naive.cls_scores(x, None, None, w, None, H, 1e-6, 10 ** -0.5), torch.float64)


# ----------------------------------------------------------------------------------- masked linear / MLP
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_matches_naive(dtype, bias):
    x = rand(B, N, D, dtype=dtype)
    w = rand(17, D, dtype=dtype, scale=D ** -0.5)
    b = rand(17, dtype=dtype) if bias else None
    for train in (True, False):
        y = ops.masked_linear(x, w, b, train)
        assert y.dtype == dtype and y.shape == (B, N, 17)
        assert_close(y, naive.linear(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_masked_mlp_matches_naive(dtype, approximate):
    x = rand(B, N, D, dtype=dtype)
    w1, b1 = rand(46, D, dtype=dtype, scale=D ** -0.5), rand(46, dtype=dtype)
    w2, b2 = rand(D, 46, dtype=dtype, scale=46 ** -0.5), rand(D, dtype=dtype)
    for train in (True, False):
        y = ops.masked_mlp(x, w1, b1, w2, b2, train, approximate)
        assert y.dtype == dtype and y.shape == (B, N, D)
        # The float64 derivation from rounded inputs; the op also rounds the hidden layer to `dtype`.
        ref = naive.mlp(x, w1, b1, w2, b2, approximate)
        assert_close(y, ref, dtype)


def test_gradcheck_masked_linear_and_mlp():
    x = rand(2, 3, 5, requires_grad=True)
    w, b = rand(4, 5, requires_grad=True), rand(4, requires_grad=True)
    w1, b1 = rand(7, 5, requires_grad=True), rand(7, requires_grad=True)
    w2, b2 = rand(5, 7, requires_grad=True), rand(5, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.masked_linear(*a, train=True), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.masked_linear(*a, train=True), (x, w, None))
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(
            lambda *a, approximate=approximate: ops.masked_mlp(*a, train=True, approximate=approximate),
            (x, w1, b1, w2, b2))
    # Frozen: the input gradient is still exact (the parameters take none, see below).
    wd, w1d, w2d = w.detach(), w1.detach(), w2.detach()
    assert torch.autograd.gradcheck(lambda t: ops.masked_linear(t, wd, b.detach(), train=False), (x,))
    assert torch.autograd.gradcheck(
        lambda t: ops.masked_mlp(t, w1d, b1.detach(), w2d, b2.detach(), train=False), (x,))


@contextlib.contextmanager
def saved_tensors():
    """Records every tensor autograd saves for backward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_masked_linear_frozen_gives_no_parameter_grads_and_saves_no_input():
    # The input is the output of an op, as inside a network, so saving it would keep it alive.
    x0 = rand(B, N, D, dtype=torch.float32, requires_grad=True)
    lin = nn.Linear(D, 17)
    with saved_tensors() as saved:
        x = x0 * 2
        y = ops.masked_linear(x, lin.weight, lin.bias, train=False)
    assert saved, "the frozen linear must save the weight for the input gradient"
    assert not any(_same_storage(t, x) for t in saved)
    assert not any(t.shape == x.shape for t in saved)
    g = torch.randn_like(y)
    y.backward(g)
    assert lin.weight.grad is None and lin.bias.grad is None
    expected = (g @ lin.weight.detach()) * 2
    torch.testing.assert_close(x0.grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_masked_mlp_frozen_gives_no_parameter_grads_and_saves_no_input(approximate):
    x0 = rand(B, N, D, dtype=torch.float32, requires_grad=True)
    mlp = Mlp(D, 46, act_layer=lambda: nn.GELU(approximate=approximate))
    with saved_tensors() as saved:
        x = x0 * 2
        y = ops.masked_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, False, approximate)
    assert not any(_same_storage(t, x) for t in saved)
    # Only one activation: GELU's input (fc1's output); no GELU output, no copy of x.
    assert [tuple(t.shape) for t in saved if t.dim() == 3] == [(B, N, 46)]
    y.backward(torch.ones_like(y))
    assert all(p.grad is None for p in mlp.parameters())
    x_ref = x0.detach().clone().requires_grad_(True)
    mlp(x_ref * 2).backward(torch.ones_like(y))
    torch.testing.assert_close(x0.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_masked_mlp_trained_saves_input_and_fc1_output_only():
    x0 = rand(B, N, D, dtype=torch.float32, requires_grad=True)
    mlp = Mlp(D, 46)
    with saved_tensors() as saved:
        x = x0 * 2
        ops.masked_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, True, "none")
    activations = [t for t in saved if t.dim() == 3]
    assert len(activations) == 2  # x and fc1's output; the GELU output is recomputed in backward
    assert any(_same_storage(t, x) for t in activations)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_trained_grads_equal_f_linear(dtype, bias):
    x = rand(B, N, D, dtype=dtype, requires_grad=True)
    lin = nn.Linear(D, 17, bias=bias, dtype=dtype)
    g = rand(B, N, 17, dtype=dtype)
    ops.masked_linear(x, lin.weight, lin.bias, train=True).backward(g)
    got = [x.grad] + [p.grad for p in lin.parameters()]
    x.grad = None
    lin.zero_grad(set_to_none=True)
    torch.nn.functional.linear(x, lin.weight, lin.bias).backward(g)
    want = [x.grad] + [p.grad for p in lin.parameters()]
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_masked_mlp_trained_grads_equal_timm_mlp(dtype, approximate):
    x = rand(B, N, D, dtype=dtype, requires_grad=True)
    mlp = Mlp(D, 46, act_layer=lambda: nn.GELU(approximate=approximate)).to(dtype)
    g = rand(B, N, D, dtype=dtype)
    y = ops.masked_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, True, approximate)
    y.backward(g)
    got = [y.detach(), x.grad] + [p.grad for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    y_ref = mlp(x)
    y_ref.backward(g)
    want = [y_ref.detach(), x.grad] + [p.grad for p in mlp.parameters()]
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_masked_mlp_without_biases():
    x = rand(B, N, D)
    w1, w2 = rand(46, D), rand(D, 46)
    assert_close(ops.masked_mlp(x, w1, None, w2, None, False), naive.mlp(x, w1, None, w2, None, "none"),
                 torch.float64)
    xs, w1s, w2s = rand(1, 3, 4, requires_grad=True), rand(6, 4, requires_grad=True), rand(4, 6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.masked_mlp(a[0], a[1], None, a[2], None, True), (xs, w1s, w2s))


# ------------------------------------------------------------------------------------------ bad input
def _x():
    return torch.randn(B, N, D)


def _idx(K=4):
    return random_indices(B, N, K)


META = torch.device("meta")

BAD_CALLS = {
    # select_tokens
    "scores rank": (lambda: ops.select_tokens(torch.rand(N), 3), ValueError, "scores"),
    "scores dtype": (lambda: ops.select_tokens(torch.randint(0, 9, (B, N)), 3), TypeError, "scores"),
    "scores not a tensor": (lambda: ops.select_tokens([[0.1, 0.2]], 1), TypeError, "scores"),
    "keep zero": (lambda: ops.select_tokens(torch.rand(B, N), 0), ValueError, "keep"),
    "keep too many": (lambda: ops.select_tokens(torch.rand(B, N), N), ValueError, "keep"),
    "keep too many with prefix": (lambda: ops.select_tokens(torch.rand(B, N), N - 2, num_prefix=3), ValueError,
                                  "keep"),
    "keep float": (lambda: ops.select_tokens(torch.rand(B, N), 2.0), ValueError, "keep"),
    "keep bool": (lambda: ops.select_tokens(torch.rand(B, N), True), ValueError, "keep"),
    "num_prefix negative": (lambda: ops.select_tokens(torch.rand(B, N), 2, num_prefix=-1), ValueError,
                            "num_prefix"),
    # gather_tokens
    "gather x rank": (lambda: ops.gather_tokens(torch.randn(N, D), _idx()), ValueError, "x"),
    "gather x dtype": (lambda: ops.gather_tokens(torch.ones(B, N, D, dtype=torch.int32), _idx()), TypeError, "x"),
    "gather idx dtype": (lambda: ops.gather_tokens(_x(), _idx().int()), TypeError, "idx"),
    "gather idx rank": (lambda: ops.gather_tokens(_x(), _idx()[0]), ValueError, "idx"),
    "gather idx device": (lambda: ops.gather_tokens(_x(), _idx().to(META)), ValueError, "idx"),
    "gather idx batch": (lambda: ops.gather_tokens(_x(), random_indices(B + 1, N, 3)), ValueError, "idx"),
    "gather idx too many": (lambda: ops.gather_tokens(_x(), torch.zeros(B, N + 1, dtype=torch.int64)),
                            ValueError, "idx"),
    "gather idx too high": (lambda: ops.gather_tokens(_x(), torch.full((B, 3), N)), IndexError, "idx"),
    "gather idx negative": (lambda: ops.gather_tokens(_x(), torch.full((B, 3), -1)), IndexError, "idx"),
    # scatter_tokens
    "scatter idx duplicate": (lambda: ops.scatter_tokens(_x(), torch.tensor([[1, 2, 1], [0, 3, 4]]),
                                                         torch.randn(B, 3, D)), ValueError, "idx"),
    "scatter idx too high": (lambda: ops.scatter_tokens(_x(), torch.tensor([[1, 2, N], [0, 3, 4]]),
                                                        torch.randn(B, 3, D)), IndexError, "idx"),
    "scatter idx device": (lambda: ops.scatter_tokens(_x(), _idx().to(META), torch.randn(B, 4, D)), ValueError,
                           "idx"),
    "scatter delta dtype": (lambda: ops.scatter_tokens(_x(), _idx(), torch.randn(B, 4, D, dtype=torch.float64)),
                            TypeError, "delta"),
    "scatter delta shape": (lambda: ops.scatter_tokens(_x(), _idx(), torch.randn(B, 5, D)), ValueError, "delta"),
    "scatter delta rank": (lambda: ops.scatter_tokens(_x(), _idx(), torch.randn(B, 4 * D)), ValueError, "delta"),
    "scatter delta device": (lambda: ops.scatter_tokens(_x(), _idx(), torch.randn(B, 4, D, device=META)),
                             ValueError, "delta"),
    "scatter x rank": (lambda: ops.scatter_tokens(torch.randn(N, D), _idx(), torch.randn(B, 4, D)), ValueError,
                       "x"),
    # gather_layer_norm
    "gln weight shape": (lambda: ops.gather_layer_norm(_x(), _idx(), torch.ones(D + 1), None), ValueError,
                         "weight"),
    "gln bias rank": (lambda: ops.gather_layer_norm(_x(), _idx(), None, torch.ones(1, D)), ValueError, "bias"),
    "gln weight device": (lambda: ops.gather_layer_norm(_x(), _idx(), torch.ones(D, device=META), None),
                          ValueError, "weight"),
    "gln weight dtype": (lambda: ops.gather_layer_norm(_x(), _idx(), torch.ones(D).double(), None), TypeError,
                         "weight"),
    "gln bias dtype": (lambda: ops.gather_layer_norm(_x().half(), _idx(), None, torch.ones(D).bfloat16()),
                       TypeError, "bias"),
    "gln idx too high": (lambda: ops.gather_layer_norm(_x(), torch.full((B, 2), N + 3), None, None), IndexError,
                         "idx"),
    "gln x dtype": (lambda: ops.gather_layer_norm(torch.ones(B, N, D, dtype=torch.int64), _idx(), None, None),
                    TypeError, "x"),
    # attention
    "attention q rank": (lambda: ops.attention(torch.randn(B, N, D), torch.randn(B, N, D), torch.randn(B, N, D)),
                         ValueError, "q"),
    "attention q dtype": (lambda: ops.attention(*(torch.ones(B, H, N, 10, dtype=torch.int32),) * 3), TypeError,
                          "q"),
    "attention k dtype": (lambda: ops.attention(torch.randn(B, H, N, 10), torch.randn(B, H, N, 10).double(),
                                                torch.randn(B, H, N, 10)), TypeError, "k"),
    "attention v shape": (lambda: ops.attention(torch.randn(B, H, N, 10), torch.randn(B, H, N, 10),
                                                torch.randn(B, H, N - 1, 10)), ValueError, "v"),
    "attention k head dim": (lambda: ops.attention(torch.randn(B, H, N, 10), torch.randn(B, H, N, 9),
                                                   torch.randn(B, H, N, 10)), ValueError, "k"),
    "attention k device": (lambda: ops.attention(torch.randn(B, H, N, 10), torch.randn(B, H, N, 10, device=META),
                                                 torch.randn(B, H, N, 10)), ValueError, "k"),
    "attention no keys": (lambda: ops.attention(torch.randn(B, H, N, 10), torch.randn(B, H, 0, 10),
                                                torch.randn(B, H, 0, 10)), ValueError, "k"),
    # cls_scores
    "cls num_heads": (lambda: ops.cls_scores(_x(), None, None, torch.randn(3 * D, D), None, 4), ValueError,
                      "num_heads"),
    "cls qkv_weight shape": (lambda: ops.cls_scores(_x(), None, None, torch.randn(D, D), None, H), ValueError,
                             "qkv_weight"),
    "cls qkv_bias shape": (lambda: ops.cls_scores(_x(), None, None, torch.randn(3 * D, D), torch.randn(D), H),
                           ValueError, "qkv_bias"),
    "cls norm_weight shape": (lambda: ops.cls_scores(_x(), torch.ones(D - 1), None, torch.randn(3 * D, D), None,
                                                     H), ValueError, "norm_weight"),
    "cls qkv_weight device": (lambda: ops.cls_scores(_x(), None, None, torch.randn(3 * D, D, device=META), None,
                                                     H), ValueError, "qkv_weight"),
    "cls x rank": (lambda: ops.cls_scores(torch.randn(N, D), None, None, torch.randn(3 * D, D), None, H),
                   ValueError, "x"),
    # masked_linear
    "linear x last dim": (lambda: ops.masked_linear(_x(), torch.randn(5, D + 1)), ValueError, "x"),
    "linear x dtype": (lambda: ops.masked_linear(torch.ones(B, D, dtype=torch.int64), torch.randn(5, D)),
                       TypeError, "x"),
    "linear weight rank": (lambda: ops.masked_linear(_x(), torch.randn(D)), ValueError, "weight"),
    "linear weight device": (lambda: ops.masked_linear(_x(), torch.randn(5, D, device=META)), ValueError,
                             "weight"),
    "linear bias shape": (lambda: ops.masked_linear(_x(), torch.randn(5, D), torch.randn(4)), ValueError, "bias"),
    "linear weight dtype": (lambda: ops.masked_linear(_x(), torch.randn(5, D).double()), TypeError, "weight"),
    "linear bias dtype": (lambda: ops.masked_linear(_x(), torch.randn(5, D), torch.randn(5).half()), TypeError,
                          "bias"),
    # masked_mlp
    "mlp x last dim": (lambda: ops.masked_mlp(_x(), torch.randn(7, D - 1), None, torch.randn(D, 7), None),
                       ValueError, "x"),
    "mlp fc2_weight": (lambda: ops.masked_mlp(_x(), torch.randn(7, D), None, torch.randn(D, 8), None),
                       ValueError, "fc2_weight"),
    "mlp fc1_bias": (lambda: ops.masked_mlp(_x(), torch.randn(7, D), torch.randn(8), torch.randn(D, 7), None),
                     ValueError, "fc1_bias"),
    "mlp fc2_bias device": (lambda: ops.masked_mlp(_x(), torch.randn(7, D), None, torch.randn(D, 7),
                                                   torch.randn(D, device=META)), ValueError, "fc2_bias"),
    "mlp fc1_weight dtype": (lambda: ops.masked_mlp(_x(), torch.randn(7, D).bfloat16(), None, torch.randn(D, 7),
                                                    None), TypeError, "fc1_weight"),
    "mlp fc2_bias dtype": (lambda: ops.masked_mlp(_x(), torch.randn(7, D), None, torch.randn(D, 7),
                                                  torch.randn(D).double()), TypeError, "fc2_bias"),
    "mlp approximate": (lambda: ops.masked_mlp(_x(), torch.randn(7, D), None, torch.randn(D, 7), None,
                                               approximate="erf"), ValueError, "approximate"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_naming_the_argument(case):
    call, error, name = BAD_CALLS[case]
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{name}:") or f"{name}:" in message or f"{name}=" in message, message


def test_gather_tokens_accepts_repeated_indices_but_scatter_does_not():
    x, idx = _x(), torch.tensor([[3, 3, 5], [0, 0, 0]])
    assert torch.equal(ops.gather_tokens(x, idx).double(), naive.gather_tokens(x, idx))
    with pytest.raises(ValueError, match="idx"):
        ops.scatter_tokens(x, idx, torch.randn(B, 3, D))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_layer_norm_accepts_float32_parameters_for_low_precision_x(dtype):
    x, idx = rand(B, N, D, dtype=dtype), _idx()
    w, b = rand(D, dtype=torch.float32), rand(D, dtype=torch.float32)
    _, y = ops.gather_layer_norm(x, idx, w, b, 1e-5)
    assert_close(y, naive.layer_norm(naive.gather_tokens(x, idx), w, b, 1e-5), dtype)


def test_masked_ops_under_autocast_take_float32_parameters():
    x = rand(B, N, D, dtype=torch.bfloat16)
    w1, w2 = rand(46, D, dtype=torch.float32, scale=D ** -0.5), rand(D, 46, dtype=torch.float32, scale=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.masked_linear(x, w1, None, train=False)
        z = ops.masked_mlp(x, w1, None, w2, None, train=False)
    assert y.dtype == z.dtype == torch.bfloat16
    assert_close(y, naive.linear(x, w1.bfloat16(), None), torch.bfloat16)
    assert_close(z, naive.mlp(x, w1.bfloat16(), None, w2.bfloat16(), None, "none"), torch.bfloat16)


def test_class_scores_stay_float32_under_autocast():
    x, w = rand(B, N, D, dtype=torch.float32), rand(3 * D, D, dtype=torch.float32, scale=D ** -0.5)
    q, k = rand(B, H, N, 10, dtype=torch.bfloat16), rand(B, H, N, 10, dtype=torch.bfloat16)
    want_scores = ops.cls_scores(x, None, None, w, None, H)
    want_row = ops.attention(q, k, k, return_cls=True)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = ops.cls_scores(x, None, None, w, None, H)
        _, row = ops.attention(q, k, k, return_cls=True)
    assert scores.dtype == row.dtype == torch.float32
    assert torch.equal(scores, want_scores) and torch.equal(row, want_row)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_runs_on_cuda(dtype):
    """The reference is pure PyTorch: the same contracts hold for CUDA tensors."""
    dev = torch.device("cuda")
    x, w, b = rand(B, N, D, dtype=dtype), rand(3 * D, D, dtype=dtype, scale=D ** -0.5), rand(3 * D, dtype=dtype)
    idx = random_indices(B, N, 6)
    q, k, v = (rand(B, H, N, 10, dtype=dtype) for _ in range(3))
    scores = ops.cls_scores(x.to(dev), None, None, w.to(dev), b.to(dev), H)
    assert_close(scores.cpu(), naive.cls_scores(x, None, None, w, b, H, 1e-6, 10 ** -0.5), torch.float32)
    chosen = ops.select_tokens(scores, 5, 1)
    assert torch.equal(chosen.cpu(), naive.select_tokens(scores.cpu().double(), 5, 1))
    assert torch.equal(ops.gather_tokens(x.to(dev), idx.to(dev)).cpu().double(), naive.gather_tokens(x, idx))
    delta = rand(B, 6, D, dtype=dtype)
    assert_close(ops.scatter_tokens(x.to(dev), idx.to(dev), delta.to(dev)).cpu(),
                 naive.scatter_tokens(x, idx, delta), dtype)
    out, cls = ops.attention(q.to(dev), k.to(dev), v.to(dev), return_cls=True)
    ref_out, ref_cls = naive.attention(q, k, v, 10 ** -0.5)
    assert_close(out.cpu(), ref_out, dtype)
    assert_close(cls.cpu(), ref_cls, torch.float32)
    assert_close(ops.masked_linear(x.to(dev), w.to(dev), b.to(dev), False).cpu(), naive.linear(x, w, b), dtype)
