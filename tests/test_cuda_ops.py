"""The CUDA kernels of ``alast_kernels._C`` against the reference backend (GPU only).

Selection and copies are exact, so they are compared bit for bit; sums (scatter, gather backward with
repeated indices, scores) follow DESIGN.md §6: float32 tight, float16/bfloat16 at most 2x the error of the
reference run in the same precision, both measured against float64, plus a small absolute slack.
Misaligned inputs are views 2 elements into NaN-filled buffers, so a kernel that read outside them would
show it.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import requires_gpu

from alast_kernels import ops
from alast_kernels import backend as _backend
from alast_kernels.backends import reference

pytestmark = requires_gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(1234)


def _assert_near_float64(out, same_precision_ref, ref64, slack):
    """DESIGN.md §6: |out - ref64| <= 2 |ref_same_precision - ref64| + slack, elementwise maxima."""
    err = (out.double() - ref64).abs().max().item()
    ref_err = (same_precision_ref.double() - ref64).abs().max().item()
    assert err <= 2 * ref_err + slack, f"kernel error {err:.3g}, reference error {ref_err:.3g}"


def _assert_matches(out, ref, ref64, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        _assert_near_float64(out, ref, ref64, slack=1e-3 if dtype == torch.float16 else 8e-3)


# ------------------------------------------------------------------------------------------ select_tokens

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,P,keep", [
    (3, 14, 1, 5),          # N = 1 + 13
    (128, 197, 1, 98),      # ViT-B/16 at 224
    (2, 30, 5, 1),          # registers, keep one
    (4, 1 + 4096, 1, 2048),  # largest row kept in shared memory
    (2, 1 + 4096, 1, 4096),  # keep everything
    (3, 1 + 5003, 1, 2500),  # beyond shared memory: keys recomputed from global memory
    (2, 9, 0, 4),           # no prefix
])
def test_select_tokens_matches_reference_exactly(cuda, gen, dtype, B, N, P, keep):
    scores = torch.rand(B, N, device="cuda", generator=gen).to(dtype)
    out = cuda.select_tokens(scores, keep, P)
    assert out.dtype == torch.int64 and out.shape == (B, P + keep)
    assert torch.equal(out, reference.select_tokens(scores, keep, P))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [18, 1 + 4096, 1 + 4500])
def test_select_tokens_ties_go_to_the_lower_index(cuda, gen, dtype, N):
    # Four distinct values: most scores tie, so the cut falls inside a run of equal keys.
    scores = torch.randint(0, 4, (5, N), device="cuda", generator=gen).to(dtype)
    for keep in (1, (N - 1) // 3, N - 2):
        assert torch.equal(cuda.select_tokens(scores, keep, 1), reference.select_tokens(scores, keep, 1))


def test_select_tokens_orders_nan_and_signed_zeros_like_torch_sort(cuda):
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[9.0, -0.0, 0.0, nan, -inf, inf, -1.0, 0.0, nan, 1e-30]], device="cuda")
    for keep in range(1, 10):
        assert torch.equal(cuda.select_tokens(scores, keep, 1), reference.select_tokens(scores, keep, 1)), keep


def test_select_tokens_reads_non_contiguous_scores(cuda, gen):
    scores = torch.rand(40, 6, device="cuda", generator=gen).t()
    assert torch.equal(cuda.select_tokens(scores, 20, 2), reference.select_tokens(scores, 20, 2))


# ------------------------------------------------------------------------------------------ gather / scatter

def _unique_idx(B, N, K, gen, sort=True):
    idx = torch.stack([torch.randperm(N, device="cuda", generator=gen)[:K] for _ in range(B)])
    return idx.sort(dim=1).values if sort else idx


def _misaligned(shape, dtype):
    """A contiguous tensor whose data pointer is 2 elements past a 16-byte boundary (scalar kernel path)."""
    numel = 1
    for s in shape:
        numel *= s
    buf = torch.full((numel + 2,), float("nan"), device="cuda", dtype=dtype)
    return buf[2:].view(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,D", [(3, 14, 7, 768), (2, 1 + 13, 5, 37), (4, 197, 98, 8), (2, 6, 0, 16)])
def test_gather_tokens_forward_is_exact_and_backward_matches(cuda, gen, dtype, B, N, K, D):
    x = torch.randn(B, N, D, device="cuda", generator=gen).to(dtype).requires_grad_()
    # Repeated indices allowed: the backward must accumulate them.
    idx = torch.randint(0, N, (B, K), device="cuda", generator=gen)
    out = cuda.gather_tokens(x, idx)
    ref = reference.gather_tokens(x, idx)
    assert torch.equal(out, ref)
    grad = torch.randn(B, K, D, device="cuda", generator=gen).to(dtype)
    (gx,) = torch.autograd.grad(out, x, grad)
    (gx_ref,) = torch.autograd.grad(ref, x, grad)
    x64 = x.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(reference.gather_tokens(x64, idx), x64, grad.double())
    _assert_matches(gx, gx_ref, gx64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_tokens_misaligned_rows(cuda, gen, dtype):
    B, N, K, D = 2, 11, 6, 24
    x = _misaligned((B, N, D), dtype)
    x.copy_(torch.randn(B, N, D, device="cuda", generator=gen))
    idx = _unique_idx(B, N, K, gen, sort=False)
    assert torch.equal(cuda.gather_tokens(x, idx), reference.gather_tokens(x, idx))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,D", [(3, 14, 7, 768), (2, 1 + 13, 5, 37), (4, 197, 98, 8), (2, 6, 6, 16),
                                     (2, 6, 0, 16)])
def test_scatter_tokens_matches_reference_with_backward(cuda, gen, dtype, B, N, K, D):
    x = torch.randn(B, N, D, device="cuda", generator=gen).to(dtype).requires_grad_()
    delta = torch.randn(B, K, D, device="cuda", generator=gen).to(dtype).requires_grad_()
    idx = _unique_idx(B, N, K, gen, sort=False)
    out = cuda.scatter_tokens(x, idx, delta)
    ref = reference.scatter_tokens(x, idx, delta)
    ref64 = reference.scatter_tokens(x.detach().double(), idx, delta.detach().double())
    _assert_matches(out, ref, ref64, dtype)
    untouched = torch.ones(B, N, dtype=torch.bool, device="cuda").scatter(1, idx, False)
    assert torch.equal(out[untouched], x.detach()[untouched])  # rows not in idx are copied exactly
    grad = torch.randn(B, N, D, device="cuda", generator=gen).to(dtype)
    gx, gd = torch.autograd.grad(out, (x, delta), grad)
    gx_ref, gd_ref = torch.autograd.grad(ref, (x, delta), grad)
    assert torch.equal(gx, gx_ref) and torch.equal(gd, gd_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_tokens_misaligned_rows(cuda, gen, dtype):
    B, N, K, D = 2, 9, 4, 40
    x = _misaligned((B, N, D), dtype)
    x.copy_(torch.randn(B, N, D, device="cuda", generator=gen))
    delta = torch.randn(B, K, D, device="cuda", generator=gen).to(dtype)
    idx = _unique_idx(B, N, K, gen)
    ref64 = reference.scatter_tokens(x.double(), idx, delta.double())
    _assert_matches(cuda.scatter_tokens(x, idx, delta), reference.scatter_tokens(x, idx, delta), ref64, dtype)


def _run_isolated(code):
    """Device-side assertions leave the CUDA context unusable: provoke them in a child process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("case", ["gather_out_of_range", "gather_negative", "scatter_duplicate",
                                  "backward_out_of_range"])
def test_bad_indices_fail_on_the_device_without_touching_memory(cuda, case):
    call = {
        "gather_out_of_range": "torch.ops.alast.gather_tokens(x, torch.tensor([[0, 5]], device='cuda'))",
        "gather_negative": "torch.ops.alast.gather_tokens(x, torch.tensor([[0, -1]], device='cuda'))",
        "scatter_duplicate": "torch.ops.alast.scatter_tokens(x, torch.tensor([[2, 2]], device='cuda'), d)",
        "backward_out_of_range": "torch.ops.alast.gather_tokens_backward(d, torch.tensor([[1, 9]], device='cuda'), 5)",
    }[case]
    done = _run_isolated(f"""
        import torch
        import alast_kernels._extension as e; e.load()
        x = torch.randn(1, 5, 8, device='cuda'); d = torch.randn(1, 2, 8, device='cuda')
        {call}
        torch.cuda.synchronize()
        print('no error')
    """)
    assert done.returncode != 0 and "no error" not in done.stdout
    assert "device-side assert" in done.stderr or "alast_kernels:" in done.stdout, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------ cls_scores

def _block_params(D, H, dtype, gen, qkv_bias=True):
    def r(*shape, s=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * s).to(dtype)
    return dict(norm_weight=1 + r(D, s=0.1), norm_bias=r(D, s=0.1), qkv_weight=r(3 * D, D, s=D ** -0.5),
                qkv_bias=r(3 * D, s=0.1) if qkv_bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,H", [(3, 14, 96, 4), (8, 197, 192, 3), (2, 1 + 4099, 64, 2), (2, 7, 36, 6)])
def test_cls_scores_matches_reference(cuda, gen, dtype, B, N, D, H):
    x = (torch.randn(B, N, D, device="cuda", generator=gen) * 2 + 0.5).to(dtype)
    p = _block_params(D, H, dtype, gen, qkv_bias=(D != 36))
    scale = (D // H) ** -0.5
    args = (p["norm_weight"], p["norm_bias"], p["qkv_weight"], p["qkv_bias"], H, 1e-6, scale, None, None)
    out = cuda.cls_scores(x, *args)
    assert out.dtype == torch.float32 and out.shape == (B, N)
    ref = reference.cls_scores(x, *args)
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
    ref64 = reference.cls_scores(x.double(), *args64)
    # Both compute in float32 from the same inputs: float32's tolerance for every input dtype, and the
    # float64 comparison for the rounding of the folded vectors.
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-7)
    _assert_near_float64(out, ref, ref64, slack=2e-6)
    torch.testing.assert_close(out.sum(1), torch.ones(B, device="cuda"), rtol=0, atol=1e-5)


def test_cls_scores_with_q_norm_and_without_affine(cuda, gen):
    B, N, D, H = 2, 1 + 13, 48, 4
    x = torch.randn(B, N, D, device="cuda", generator=gen)
    w = torch.randn(3 * D, D, device="cuda", generator=gen) * D ** -0.5
    q_norm = torch.nn.LayerNorm(D // H, eps=1e-6).cuda()
    args = (None, None, w, None, H, 1e-5, 0.3, q_norm, None)
    torch.testing.assert_close(cuda.cls_scores(x, *args), reference.cls_scores(x, *args), rtol=2e-5, atol=1e-7)


def test_cls_scores_with_k_norm_runs_the_reference(cuda, gen):
    B, N, D, H = 2, 9, 32, 2
    x = torch.randn(B, N, D, device="cuda", generator=gen)
    p = _block_params(D, H, torch.float32, gen)
    k_norm = torch.nn.LayerNorm(D // H).cuda()
    args = (p["norm_weight"], p["norm_bias"], p["qkv_weight"], p["qkv_bias"], H, 1e-6, 0.25, None, k_norm)
    assert torch.equal(cuda.cls_scores(x, *args), reference.cls_scores(x, *args))


# ------------------------------------------------------------------------------------------ wiring, opcheck

def test_public_ops_use_the_cuda_kernels_under_the_cuda_backend(cuda, gen, monkeypatch):
    monkeypatch.setattr(_backend, "_selected", "cuda")
    for op in ("select_tokens", "gather_tokens", "scatter_tokens", "cls_scores"):
        assert _backend.implementation(op, torch.device("cuda")) is cuda.OPS[op]
    x = torch.randn(2, 10, 16, device="cuda", generator=gen)
    idx = ops.select_tokens(x.norm(dim=-1), 4, 1)
    torch.testing.assert_close(ops.gather_tokens(x, idx), reference.gather_tokens(x, idx), rtol=0, atol=0)


def test_opcheck_every_op(cuda, gen):
    x = torch.randn(3, 11, 24, device="cuda", generator=gen)
    idx = _unique_idx(3, 11, 4, gen)
    delta = torch.randn(3, 4, 24, device="cuda", generator=gen)
    u = torch.randn(3, 2, 24, device="cuda", generator=gen)
    cases = [
        (torch.ops.alast.select_tokens.default, (x[..., 0].contiguous(), 4, 1)),
        (torch.ops.alast.gather_tokens.default, (x, idx)),
        (torch.ops.alast.gather_tokens_backward.default, (delta, idx, 11)),
        (torch.ops.alast.scatter_tokens.default, (x, idx, delta)),
        (torch.ops.alast.cls_scores.default, (x, u, 1e-6)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_gather_backward_sums_repeated_indices_like_float64(cuda, gen):
    # gradcheck needs float64, which the kernels do not take: check the vector-Jacobian product against
    # the float64 sums of the same float32 numbers instead.
    B, N, K, D = 2, 12, 5, 20
    x = torch.randn(B, N, D, device="cuda", generator=gen, requires_grad=True)
    idx = torch.randint(0, N, (B, K), device="cuda", generator=gen)
    g = torch.randn(B, K, D, device="cuda", generator=gen)
    (gx,) = torch.autograd.grad(cuda.gather_tokens(x, idx), x, g)
    expected = torch.zeros(B, N, D, device="cuda", dtype=torch.float64).index_put_(
        (torch.arange(B, device="cuda")[:, None].expand(B, K), idx), g.double(), accumulate=True)
    torch.testing.assert_close(gx.double(), expected, rtol=1e-6, atol=1e-6)
