"""Triton kernels against their PyTorch baselines (pytest-benchmark; needs a CUDA GPU, skips otherwise).

Run: ``python -m pytest benchmarks/bench_triton_ops.py --benchmark-only``. Every benchmark records the
device, shapes, dtype and bytes moved in ``benchmark.extra_info``; at the end of the module the medians
are written to ``benchmarks/results/triton_ops.json`` by :func:`record.write_results` (device,
torch/triton/CUDA versions, commit, date). With ``--benchmark-disable`` (``make test``) each benchmark runs
once as a smoke test and nothing is written.

Shapes: ViT-B/16 at 224 px, batch 128: ``N = 197`` tokens, ``D = 768``, 12 heads of 64, keep 98 of
the 196 patches (``K = 99`` with the class token).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alast_kernels.measure import median_seconds
from record import write_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

B, N, D, H = 128, 197, 768, 12
KEEP = 98
_records: list = []


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    if _records:
        write_results("triton_ops", {"results": _records})


def _run(benchmark, fn, op: str, variant: str, bytes_moved: int = 0, flops: int = 0, **shapes):
    """Time ``fn`` with ``measure.median_seconds`` (synchronised), record the median and throughput; under
    ``--benchmark-disable`` run it once as a smoke."""
    benchmark.extra_info.update(op=op, variant=variant, device=torch.cuda.get_device_name(), **shapes)
    if benchmark.disabled:
        benchmark(fn)
        return
    (median,) = median_seconds([fn], repeats=30, warmup=3)
    benchmark.pedantic(fn, rounds=1, iterations=1)  # pytest-benchmark's own table: one call; the record is above
    record = dict(benchmark.extra_info, median_s=median)
    if bytes_moved:
        record["bandwidth_GBps"] = bytes_moved / median / 1e9
    if flops:
        record["TFLOPs"] = flops / median / 1e12
    benchmark.extra_info.update({k: v for k, v in record.items() if k not in benchmark.extra_info})
    _records.append(record)


@pytest.fixture(scope="module")
def T():
    from alast_kernels.backends.triton import OPS  # imported here: only once a GPU is known to exist

    return OPS


def _vit_inputs(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, N, D, device="cuda", dtype=dtype, generator=gen)
    scores = torch.rand(B, N, device="cuda", generator=gen)
    idx = torch.cat([torch.zeros(B, 1, dtype=torch.int64, device="cuda"),
                     scores[:, 1:].topk(KEEP, dim=1).indices.sort(dim=1).values + 1], dim=1)
    return x, idx


SHAPES = dict(B=B, N=N, D=D, H=H, keep=KEEP)


# ------------------------------------------------------------------------------------------ memory-bound
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_copy_bandwidth(benchmark, dtype):
    """The device's measured copy bandwidth: the yardstick of the ≥ 70% target."""
    x, _ = _vit_inputs(dtype)
    out = torch.empty_like(x)
    _run(benchmark, lambda: out.copy_(x), "copy", "torch", bytes_moved=2 * x.numel() * x.element_size(),
         dtype=str(dtype), **SHAPES)


def _projected_key_scores(x, nw, nb, w, b, scale):
    """Baseline: project every key (a full (B, N, D) x (D, D) matmul), softmax, head mean."""
    h = F.layer_norm(x, (D,), nw, nb, 1e-6)
    q = F.linear(h[:, 0], w[:D], b[:D]).view(B, H, D // H)
    k = F.linear(h, w[D:2 * D], b[D:2 * D]).view(B, N, H, D // H)
    return (torch.einsum("bhe,bnhe->bhn", q.float(), k.float()) * scale).softmax(-1).mean(1)


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cls_scores(benchmark, T, variant, dtype):
    x, _ = _vit_inputs(dtype)
    nw, nb = torch.ones(D, device="cuda", dtype=dtype), torch.zeros(D, device="cuda", dtype=dtype)
    w = torch.randn(3 * D, D, device="cuda", dtype=dtype) * D ** -0.5
    b = torch.zeros(3 * D, device="cuda", dtype=dtype)
    scale = (D // H) ** -0.5
    if variant == "triton":
        fn = lambda: T["cls_scores"](x, nw, nb, w, b, H, 1e-6, scale, None, None)  # noqa: E731
    else:
        fn = lambda: _projected_key_scores(x, nw, nb, w, b, scale)  # noqa: E731
    with torch.no_grad():
        _run(benchmark, fn, "cls_scores", variant, bytes_moved=x.numel() * x.element_size(), dtype=str(dtype),
             **SHAPES)


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gather_layer_norm(benchmark, T, variant, dtype):
    x, idx = _vit_inputs(dtype)
    w, b = torch.ones(D, device="cuda", dtype=dtype), torch.zeros(D, device="cuda", dtype=dtype)
    if variant == "triton":
        fn = lambda: T["gather_layer_norm"](x, idx, w, b, 1e-6)  # noqa: E731
    else:
        def fn():
            kept = x.gather(1, idx[..., None].expand(-1, -1, D))
            return kept, F.layer_norm(kept, (D,), w, b, 1e-6)
    # read K rows, write them twice (tokens and their LayerNorm)
    moved = 3 * idx.numel() * D * x.element_size()
    with torch.no_grad():
        _run(benchmark, fn, "gather_layer_norm", variant, bytes_moved=moved, dtype=str(dtype), **SHAPES)


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_scatter(benchmark, T, variant, dtype):
    x, idx = _vit_inputs(dtype)
    delta = torch.randn(B, idx.shape[1], D, device="cuda", dtype=dtype)
    if variant == "triton":
        fn = lambda: T["scatter_tokens"](x, idx, delta)  # noqa: E731
    else:
        fn = lambda: x.scatter_add(1, idx[..., None].expand(-1, -1, D), delta)  # noqa: E731
    moved = (2 * x.numel() + delta.numel()) * x.element_size()  # read x and delta, write out
    with torch.no_grad():
        _run(benchmark, fn, "scatter_tokens", variant, bytes_moved=moved, dtype=str(dtype), **SHAPES)


@pytest.mark.parametrize("variant", ["triton", "torch"])
@pytest.mark.parametrize("n", [N, 4097])
def test_select(benchmark, T, variant, n):
    scores = torch.rand(B, n, device="cuda")
    keep = (n - 1) // 2
    if variant == "triton":
        fn = lambda: T["select_tokens"](scores, keep, 1)  # noqa: E731
    else:
        def fn():
            chosen = scores[:, 1:].topk(keep, dim=1).indices.sort(dim=1).values + 1
            return torch.cat([torch.zeros(B, 1, dtype=torch.int64, device="cuda"), chosen], dim=1)
    _run(benchmark, fn, "select_tokens", variant, B=B, N=n, keep=keep, dtype="float32")


# ------------------------------------------------------------------------------------------ attention
def _qkv(dtype, n):
    qkv = torch.randn(B, n, 3, H, D // H, device="cuda", dtype=dtype, requires_grad=True)
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("variant", ["triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_forward_backward(benchmark, T, variant, dtype):
    n = KEEP + 1
    qkv, (q, k, v) = _qkv(dtype, n)
    g = torch.randn(B, H, n, D // H, device="cuda", dtype=dtype)
    scale = (D // H) ** -0.5
    attend = ((lambda: T["attention"](q, k, v, scale, False)) if variant == "triton" else
              (lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)))

    def fn():
        torch.autograd.backward(attend(), g, inputs=[qkv])
    flops = 4 * B * H * n * n * (D // H) * 7 // 2  # forward 2 matmuls + backward 5, 2 flops per MAC
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        _run(benchmark, fn, "attention_fwd_bwd", variant, flops=flops, dtype=str(dtype), **SHAPES)


@pytest.mark.parametrize("variant", ["triton", "gather+sdpa+scores"])
def test_attention_with_class_row(benchmark, T, variant):
    """Kept-token attention emitting the class-token row vs gather + SDPA + a separate score pass."""
    dtype = torch.bfloat16
    n = KEEP + 1
    qkv_full, (qf, kf, vf) = _qkv(dtype, N)
    _, idx = _vit_inputs(dtype)
    scale = (D // H) ** -0.5
    with torch.no_grad():
        q, k, v = (t.gather(2, idx[:, None, :, None].expand(-1, H, -1, D // H)) for t in (qf, kf, vf))
    if variant == "triton":
        fn = lambda: T["attention"](q, k, v, scale, True)  # noqa: E731
    else:
        def fn():
            qq, kk, vv = (t.gather(2, idx[:, None, :, None].expand(-1, H, -1, D // H)) for t in (qf, kf, vf))
            out = F.scaled_dot_product_attention(qq, kk, vv, scale=scale)
            row = (torch.einsum("bhd,bhnd->bhn", qq[:, :, 0].float(), kk.float()) * scale).softmax(-1).mean(1)
            return out, row
    with torch.no_grad():
        _run(benchmark, fn, "attention_cls_fwd", variant, dtype=str(dtype), **dict(SHAPES, kept_tokens=n))


# ------------------------------------------------------------------------------------------ MLP
@pytest.mark.parametrize("variant", ["triton", "reference"])
@pytest.mark.parametrize("train", [True, False])
def test_masked_mlp(benchmark, T, variant, train):
    from alast_kernels.backends.reference import OPS as R

    dtype = torch.bfloat16
    n = KEEP + 1
    x = torch.randn(B, n, D, device="cuda", dtype=dtype, requires_grad=True)
    w1 = (torch.randn(4 * D, D, device="cuda", dtype=dtype) * D ** -0.5).requires_grad_(train)
    w2 = (torch.randn(D, 4 * D, device="cuda", dtype=dtype) * (4 * D) ** -0.5).requires_grad_(train)
    b1 = torch.zeros(4 * D, device="cuda", dtype=dtype, requires_grad=train)
    b2 = torch.zeros(D, device="cuda", dtype=dtype, requires_grad=train)
    g = torch.randn(B, n, D, device="cuda", dtype=dtype)
    ops_table = T if variant == "triton" else R

    def fn():
        ops_table["masked_mlp"](x, w1, b1, w2, b2, train, "tanh").backward(g)
    flops = 2 * B * n * D * 4 * D * 2 * (3 if train else 2)
    _run(benchmark, fn, "masked_mlp_fwd_bwd", variant, flops=flops, dtype=str(dtype), train=train,
         **dict(SHAPES, tokens=n))
    assert math.isfinite(float(x.grad.float().abs().sum()))
