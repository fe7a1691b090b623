"""The CUDA kernels of ``csrc/`` against the reference backend — on a GPU, or without one on the CPU under the
CUDA emulation (``ALAST_CUDA_EMULATION=1``, chosen by the root conftest): the same kernel sources and the
same Python path either way (docs/cuda-emulation.md).

Selection and copies are exact, so they are compared bit for bit; sums (scatter, gather backward with
repeated indices, scores) follow docs/testing.md: float32 tight, float16/bfloat16 at most 2x the error of the
reference run in the same precision, both measured against float64, plus a small absolute slack.
Misaligned inputs are views 2 elements into NaN-filled buffers, so a kernel that read outside them would
show it. Under the emulation every CUDA thread is a host thread, so batches are smaller there (each row is
computed alone, so a few rows show what many do); the shapes that pick kernel paths are the same.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from alast_kernels import _cuda_emulation, ops
from alast_kernels import backend as _backend
from alast_kernels.backends import reference
from tolerance import assert_flash_rule

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
BATCH = 128 if ON_GPU else 4  # the ViT-B/16 case's batch
ROWS = 5 if ON_GPU else 2  # rows of the long-row tie cases
LONG_N = 1 + 4099 if ON_GPU else 1 + 515  # cls_scores' long sequence
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

emulation_only = pytest.mark.skipif(ON_GPU, reason="launch records come from the CUDA emulation")


@pytest.fixture
def gen():
    return torch.Generator(device=DEVICE).manual_seed(1234)


def _assert_matches(out, ref, ref64, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        assert_flash_rule("out", out, ref, ref64, slack=1e-3 if dtype == torch.float16 else 8e-3)


# ------------------------------------------------------------------------------------------ select_tokens

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,P,keep", [
    (3, 14, 1, 5),           # N = 1 + 13
    (BATCH, 197, 1, 98),     # ViT-B/16 at 224
    (2, 30, 5, 1),           # registers, keep one
    (2, 1 + 4096, 1, 2048),  # largest row kept in shared memory
    (2, 1 + 4096, 1, 4096),  # keep everything
    (2, 1 + 5003, 1, 2500),  # beyond shared memory: keys recomputed from global memory
    (2, 9, 0, 4),            # no prefix
])
def test_select_tokens_matches_reference_exactly(cuda, gen, dtype, B, N, P, keep):
    scores = torch.rand(B, N, device=DEVICE, generator=gen).to(dtype)
    out = cuda.select_tokens(scores, keep, P)
    assert out.dtype == torch.int64 and out.shape == (B, P + keep)
    assert torch.equal(out, reference.select_tokens(scores, keep, P))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [18, 1 + 4096, 1 + 4500])
def test_select_tokens_ties_go_to_the_lower_index(cuda, gen, dtype, N):
    # Four distinct values: most scores tie, so the cut falls inside a run of equal keys.
    scores = torch.randint(0, 4, (ROWS, N), device=DEVICE, generator=gen).to(dtype)
    for keep in (1, (N - 1) // 3, N - 2):
        assert torch.equal(cuda.select_tokens(scores, keep, 1), reference.select_tokens(scores, keep, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_tokens_orders_nan_and_signed_zeros_like_torch_sort(cuda, dtype):
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[9.0, -0.0, 0.0, nan, -inf, inf, -1.0, 0.0, -nan, 1e-30]], device=DEVICE).to(dtype)
    for keep in range(1, 10):
        assert torch.equal(cuda.select_tokens(scores, keep, 1), reference.select_tokens(scores, keep, 1)), keep


def test_select_tokens_reads_non_contiguous_scores(cuda, gen):
    scores = torch.rand(40, 6, device=DEVICE, generator=gen).t()
    assert torch.equal(cuda.select_tokens(scores, 20, 2), reference.select_tokens(scores, 20, 2))


@emulation_only
@pytest.mark.parametrize("N,cached", [(1 + 4096, True), (1 + 4097, False)])
def test_select_tokens_takes_the_shared_memory_path_up_to_4096_candidates(cuda, N, cached):
    scores = torch.rand(1, N)
    with _cuda_emulation.recorded_launches() as launches:
        cuda.select_tokens(scores, 7, 1)
    (launch,) = launches
    assert launch.kernel.endswith(f"select_tokens_kernel<alast::F32, {str(cached).lower()}>"), launch
    assert launch.shared_bytes == (4 * (N - 1) if cached else 0)
    assert launch.threads == 1024 and launch.grid == (1, 1, 1)


# ------------------------------------------------------------------------------------------ gather / scatter

def _unique_idx(B, N, K, gen, sort=True):
    idx = torch.stack([torch.randperm(N, device=DEVICE, generator=gen)[:K] for _ in range(B)])
    return idx.sort(dim=1).values if sort else idx


def _misaligned(shape, dtype):
    """A contiguous tensor whose data pointer is 2 elements past a 16-byte boundary (scalar kernel path)."""
    numel = 1
    for s in shape:
        numel *= s
    buf = torch.full((numel + 2,), float("nan"), device=DEVICE, dtype=dtype)
    return buf[2:].view(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,D", [(3, 14, 7, 768), (2, 1 + 13, 5, 37), (4, 197, 98, 8), (2, 6, 0, 16)])
def test_gather_tokens_forward_is_exact_and_backward_matches(cuda, gen, dtype, B, N, K, D):
    x = torch.randn(B, N, D, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    # Repeated indices allowed: the backward must accumulate them.
    idx = torch.randint(0, N, (B, K), device=DEVICE, generator=gen)
    out = cuda.gather_tokens(x, idx)
    ref = reference.gather_tokens(x, idx)
    assert torch.equal(out, ref)
    grad = torch.randn(B, K, D, device=DEVICE, generator=gen).to(dtype)
    (gx,) = torch.autograd.grad(out, x, grad)
    (gx_ref,) = torch.autograd.grad(ref, x, grad)
    x64 = x.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(reference.gather_tokens(x64, idx), x64, grad.double())
    _assert_matches(gx, gx_ref, gx64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_tokens_misaligned_rows(cuda, gen, dtype):
    B, N, K, D = 2, 11, 6, 24
    x = _misaligned((B, N, D), dtype)
    x.copy_(torch.randn(B, N, D, device=DEVICE, generator=gen))
    idx = _unique_idx(B, N, K, gen, sort=False)
    assert torch.equal(cuda.gather_tokens(x, idx), reference.gather_tokens(x, idx))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K,D", [(3, 14, 7, 768), (2, 1 + 13, 5, 37), (4, 197, 98, 8), (2, 6, 6, 16),
                                     (2, 6, 0, 16)])
def test_scatter_tokens_matches_reference_with_backward(cuda, gen, dtype, B, N, K, D):
    x = torch.randn(B, N, D, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    delta = torch.randn(B, K, D, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    idx = _unique_idx(B, N, K, gen, sort=False)
    out = cuda.scatter_tokens(x, idx, delta)
    ref = reference.scatter_tokens(x, idx, delta)
    ref64 = reference.scatter_tokens(x.detach().double(), idx, delta.detach().double())
    _assert_matches(out, ref, ref64, dtype)
    untouched = torch.ones(B, N, dtype=torch.bool, device=DEVICE).scatter(1, idx, False)
    assert torch.equal(out[untouched], x.detach()[untouched])  # rows not in idx are copied exactly
    grad = torch.randn(B, N, D, device=DEVICE, generator=gen).to(dtype)
    gx, gd = torch.autograd.grad(out, (x, delta), grad)
    gx_ref, gd_ref = torch.autograd.grad(ref, (x, delta), grad)
    assert torch.equal(gx, gx_ref) and torch.equal(gd, gd_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_tokens_misaligned_rows(cuda, gen, dtype):
    B, N, K, D = 2, 9, 4, 40
    x = _misaligned((B, N, D), dtype)
    x.copy_(torch.randn(B, N, D, device=DEVICE, generator=gen))
    delta = torch.randn(B, K, D, device=DEVICE, generator=gen).to(dtype)
    idx = _unique_idx(B, N, K, gen)
    ref64 = reference.scatter_tokens(x.double(), idx, delta.double())
    _assert_matches(cuda.scatter_tokens(x, idx, delta), reference.scatter_tokens(x, idx, delta), ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_storage_round_trips_every_value_and_rounds_sums_like_torch(cuda, dtype):
    """The kernels' float16/bfloat16 loads and stores: every one of the 65536 bit patterns survives a
    load-store round trip (a gather backward with unique indices adds each value to 0), and a float32 sum
    stored back rounds to nearest even exactly as PyTorch's conversion does."""
    patterns = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).to(DEVICE)
    grad = patterns.view(1, 65536 // 64, 64)  # 1024 tokens of 64 channels
    idx = torch.arange(grad.shape[1], device=DEVICE).flip(0).unsqueeze(0)
    back = torch.ops.alast.gather_tokens_backward(grad, idx, grad.shape[1])
    expected = grad.flip(1)
    nan = expected.isnan()
    assert torch.equal(back.isnan(), nan) and torch.equal(back[~nan], expected[~nan])
    # Sums that need rounding: a value plus a small one (ties, subnormals, overflow to inf included).
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    x = (torch.randn(1, 1024, 64, device=DEVICE, generator=gen) * 1e3).to(dtype)
    delta = (torch.randn(1, 1024, 64, device=DEVICE, generator=gen) * 0.37).to(dtype)
    x.view(-1)[:64] = torch.tensor(65504.0 if dtype == torch.float16 else 3.0e38).to(dtype)
    delta.view(-1)[:64] = torch.linspace(0, 40 if dtype == torch.float16 else 2e36, 64).to(dtype)
    x.view(-1)[64:128] = torch.tensor(2.0 ** -24 if dtype == torch.float16 else 1e-40).to(dtype)
    idx = torch.arange(1024, device=DEVICE).unsqueeze(0)
    out = torch.ops.alast.scatter_tokens(x, idx, delta)
    assert torch.equal(out, (x.float() + delta.float()).to(dtype))


def _run_isolated(code):
    """Device-side assertions leave the CUDA context unusable: provoke them in a child process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


BAD_INDEX_CALLS = {
    "gather_out_of_range": ("torch.ops.alast.gather_tokens(x, torch.tensor([[0, 5]], device=dev))",
                            r"gather_tokens: idx\[0, 1\] = 5 is outside \[0, 5\)"),
    "gather_negative": ("torch.ops.alast.gather_tokens(x, torch.tensor([[0, -1]], device=dev))",
                        r"gather_tokens: idx\[0, 1\] = -1 is outside \[0, 5\)"),
    "scatter_duplicate": ("torch.ops.alast.scatter_tokens(x, torch.tensor([[2, 2]], device=dev), d)",
                          r"scatter_tokens: index 2 repeats in row 0 of idx"),
    "backward_out_of_range": ("torch.ops.alast.gather_tokens_backward(d, torch.tensor([[1, 9]], device=dev), 5)",
                              r"idx\[0, 1\] = 9 is outside \[0, 5\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEX_CALLS))
def test_bad_indices_fail_on_the_device_without_touching_memory(cuda, case):
    call, message = BAD_INDEX_CALLS[case]
    if ON_GPU:
        done = _run_isolated(f"""
            import torch
            import alast_kernels._extension as e; e.load()
            dev = 'cuda'
            x = torch.randn(1, 5, 8, device=dev); d = torch.randn(1, 2, 8, device=dev)
            {call}
            torch.cuda.synchronize()
            print('no error')
        """)
        assert done.returncode != 0 and "no error" not in done.stdout
        assert "device-side assert" in done.stderr or "alast_kernels:" in done.stdout, done.stderr[-2000:]
        return
    # Emulated: the assertion stops the launch and the op raises it, naming the kernel and the thread.
    dev = "cpu"
    x, d = torch.full((1, 5, 8), 3.0), torch.full((1, 2, 8), 5.0)
    x_before = x.clone()
    with pytest.raises(RuntimeError, match=f"device-side assertion .* {message}"):
        eval(call, {"torch": torch, "x": x, "d": d, "dev": dev})
    assert torch.equal(x, x_before)


# ------------------------------------------------------------------------------------------ cls_scores

def _block_params(D, H, dtype, gen, qkv_bias=True, norm_affine=True):
    def r(*shape, s=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=gen) * s).to(dtype)
    return dict(norm_weight=1 + r(D, s=0.1) if norm_affine else None, norm_bias=r(D, s=0.1) if norm_affine else None,
                qkv_weight=r(3 * D, D, s=D ** -0.5), qkv_bias=r(3 * D, s=0.1) if qkv_bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,H", [(3, 14, 96, 4), (2, 197, 192, 3), (2, LONG_N, 64, 2), (2, 7, 36, 6)])
def test_cls_scores_matches_reference(cuda, gen, dtype, B, N, D, H):
    x = (torch.randn(B, N, D, device=DEVICE, generator=gen) * 2 + 0.5).to(dtype)
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
    assert_flash_rule("out", out, ref, ref64, slack=2e-6)
    torch.testing.assert_close(out.sum(1), torch.ones(B, device=DEVICE), rtol=0, atol=1e-5)


def test_cls_scores_with_q_norm_and_without_affine(cuda, gen):
    B, N, D, H = 2, 1 + 13, 48, 4
    x = torch.randn(B, N, D, device=DEVICE, generator=gen)
    w = torch.randn(3 * D, D, device=DEVICE, generator=gen) * D ** -0.5
    q_norm = torch.nn.LayerNorm(D // H, eps=1e-6).to(DEVICE)
    args = (None, None, w, None, H, 1e-5, 0.3, q_norm, None)
    torch.testing.assert_close(cuda.cls_scores(x, *args), reference.cls_scores(x, *args), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("norm_affine", [False, True])
def test_cls_scores_under_autocast_compute_in_float32(cuda, gen, norm_affine, monkeypatch):
    """The class-query vectors are computed with autocast off: under bfloat16 autocast (the GPU benchmark's
    setting) they stay float32 — also for a LayerNorm without weight, where nothing else promotes them —
    and the scores equal those computed without autocast."""
    B, N, D, H = 2, 1 + 13, 48, 4
    x = torch.randn(B, N, D, device=DEVICE, generator=gen)
    p = _block_params(D, H, torch.float32, gen, norm_affine=norm_affine)
    args = (p["norm_weight"], p["norm_bias"], p["qkv_weight"], p["qkv_bias"], H, 1e-6, 0.25, None, None)
    plain = cuda.cls_scores(x, *args)
    monkeypatch.setattr(_backend, "_selected", "cuda")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        direct = cuda.cls_scores(x, *args)
        public = ops.cls_scores(x, *args[:5], eps=1e-6, scale=0.25)
    torch.testing.assert_close(direct, plain, rtol=0, atol=0)
    torch.testing.assert_close(public, plain, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ wiring, opcheck

def test_public_ops_use_the_cuda_kernels_under_the_cuda_backend(cuda, gen, monkeypatch):
    monkeypatch.setattr(_backend, "_selected", "cuda")
    for op in ("select_tokens", "gather_tokens", "scatter_tokens", "cls_scores"):
        assert _backend.implementation(op, DEVICE, torch.float32) is cuda.OPS[op]
    x = torch.randn(2, 10, 16, device=DEVICE, generator=gen)
    idx = ops.select_tokens(x.norm(dim=-1), 4, 1)
    torch.testing.assert_close(ops.gather_tokens(x, idx), reference.gather_tokens(x, idx), rtol=0, atol=0)


def test_opcheck_every_op(cuda, gen):
    x = torch.randn(3, 11, 24, device=DEVICE, generator=gen)
    idx = _unique_idx(3, 11, 4, gen)
    delta = torch.randn(3, 4, 24, device=DEVICE, generator=gen)
    u = torch.randn(3, 2, 24, device=DEVICE, generator=gen)
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
    x = torch.randn(B, N, D, device=DEVICE, generator=gen, requires_grad=True)
    idx = torch.randint(0, N, (B, K), device=DEVICE, generator=gen)
    g = torch.randn(B, K, D, device=DEVICE, generator=gen)
    (gx,) = torch.autograd.grad(cuda.gather_tokens(x, idx), x, g)
    expected = torch.zeros(B, N, D, device=DEVICE, dtype=torch.float64).index_put_(
        (torch.arange(B, device=DEVICE)[:, None].expand(B, K), idx), g.double(), accumulate=True)
    torch.testing.assert_close(gx.double(), expected, rtol=1e-6, atol=1e-6)
