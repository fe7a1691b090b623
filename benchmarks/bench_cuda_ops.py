"""The CUDA kernels of ``alast_kernels._C`` against PyTorch baselines and their Triton twins (GPU only).

Shapes: ViT-B/16 at 224 px, batch 128: ``N = 197`` tokens, ``D = 768``, 12 heads, keep 98 of the 196
patches. Targets (issue 4): ``select_tokens`` ≥ 3× faster than ``torch.topk`` + sort + concatenation;
gather/scatter at ≥ 80 % of the copy bandwidth measured here for the same bytes. Each variant is timed with
``alast_kernels.measure.median_seconds`` (median of ``REPEATS`` timings of ``INNER`` back-to-back calls
between CUDA synchronisations, after warm-up), variants of one comparison interleaved; pytest-benchmark
records the CUDA kernel itself. ``make bench`` on a GPU writes
``benchmarks/results/cuda_ops.json`` (device, torch/triton/CUDA versions, commit, date). Skipped without a
CUDA device; with ``--benchmark-disable`` (``make test``) nothing is timed or written.
"""
from __future__ import annotations

import pytest
import torch

from alast_kernels import backend as _backend
from alast_kernels.backends import reference
from alast_kernels.measure import median_seconds

from record import write_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

B, N, D, H, KEEP, P = 128, 197, 768, 12, 98, 1
REPEATS, INNER = 25, 20
TARGETS = {"select_speedup_vs_topk": 3.0, "gather_fraction_of_copy": 0.8, "scatter_fraction_of_copy": 0.8}
_results: dict = {}


@pytest.fixture(scope="module")
def triton_ops():
    """The Triton backend's ops, or an empty dict where it is missing."""
    module = _backend.load("triton")
    return {} if module is None else module.OPS


@pytest.fixture(scope="module", autouse=True)
def _write(request):
    yield
    if _results and not request.config.getoption("benchmark_disable"):
        write_results("cuda_ops", {"shapes": {"B": B, "N": N, "D": D, "H": H, "keep": KEEP},
                                   "targets": TARGETS, "results": _results})


def _compare(benchmark, name: str, variants: dict, bytes_moved: int = 0) -> dict:
    """Times every variant (interleaved rounds), records microseconds (and GB/s), benchmarks the first."""
    first = next(iter(variants.values()))
    if benchmark.disabled:  # smoke test: every variant runs once
        for fn in list(variants.values())[1:]:
            fn()
        benchmark(first)
        return {}
    seconds = median_seconds(list(variants.values()), repeats=REPEATS, warmup=3, inner=INNER)
    row = {key: {"us": s * 1e6} for key, s in zip(variants, seconds)}
    if bytes_moved:
        for entry in row.values():
            entry["GB/s"] = bytes_moved / (entry["us"] * 1e-6) / 1e9
    _results[name] = row
    benchmark.pedantic(first, rounds=REPEATS, iterations=INNER, warmup_rounds=1)
    return row


def test_select_tokens(benchmark, cuda, triton_ops):
    scores = torch.rand(B, N, device="cuda").softmax(dim=1)
    prefix = torch.arange(P, device="cuda").expand(B, P)

    def topk_sort_cat():
        chosen = scores[:, P:].topk(KEEP, dim=1).indices.sort(dim=1).values + P
        return torch.cat([prefix, chosen], dim=1)

    variants = {"cuda": lambda: cuda.select_tokens(scores, KEEP, P), "torch_topk_sort_cat": topk_sort_cat,
                "reference": lambda: reference.select_tokens(scores, KEEP, P)}
    if "select_tokens" in triton_ops:
        variants["triton"] = lambda: triton_ops["select_tokens"](scores, KEEP, P)
    row = _compare(benchmark, "select_tokens", variants)
    if row:
        row["speedup_vs_topk"] = row["torch_topk_sort_cat"]["us"] / row["cuda"]["us"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_tokens(benchmark, cuda, triton_ops, dtype):
    x = torch.randn(B, N, D, device="cuda", dtype=dtype)
    idx = cuda.select_tokens(torch.rand(B, N, device="cuda"), KEEP, P)
    K = idx.shape[1]
    src, dst = torch.empty(B, K, D, device="cuda", dtype=dtype), torch.empty(B, K, D, device="cuda", dtype=dtype)
    variants = {"cuda": lambda: cuda.gather_tokens(x, idx), "copy": lambda: dst.copy_(src),
                "reference": lambda: reference.gather_tokens(x, idx)}
    if "gather_tokens" in triton_ops:
        variants["triton"] = lambda: triton_ops["gather_tokens"](x, idx)
    row = _compare(benchmark, f"gather_tokens_{str(dtype)[6:]}", variants, 2 * src.numel() * src.element_size())
    if row:
        row["fraction_of_copy"] = row["copy"]["us"] / row["cuda"]["us"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scatter_tokens(benchmark, cuda, triton_ops, dtype):
    x = torch.randn(B, N, D, device="cuda", dtype=dtype)
    idx = cuda.select_tokens(torch.rand(B, N, device="cuda"), KEEP, P)
    delta = torch.randn(B, idx.shape[1], D, device="cuda", dtype=dtype)
    # Bytes the op must move: read x and delta, write the output.
    moved = (2 * x.numel() + delta.numel()) * x.element_size()
    src = torch.empty(moved // 2 // x.element_size(), device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    variants = {"cuda": lambda: cuda.scatter_tokens(x, idx, delta), "copy": lambda: dst.copy_(src),
                "reference": lambda: reference.scatter_tokens(x, idx, delta)}
    if "scatter_tokens" in triton_ops:
        variants["triton"] = lambda: triton_ops["scatter_tokens"](x, idx, delta)
    row = _compare(benchmark, f"scatter_tokens_{str(dtype)[6:]}", variants, moved)
    if row:
        row["fraction_of_copy"] = row["copy"]["us"] / row["cuda"]["us"]


def test_gather_tokens_backward(benchmark, cuda, dtype=torch.bfloat16):
    grad = torch.randn(B, KEEP + P, D, device="cuda", dtype=dtype)
    idx = cuda.select_tokens(torch.rand(B, N, device="cuda"), KEEP, P)
    moved = (grad.numel() + B * N * D) * grad.element_size()
    src = torch.empty(moved // 2 // grad.element_size(), device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    zeros_index_add = (lambda: torch.zeros(B, N, D, device="cuda", dtype=dtype).scatter_add_(
        1, idx.unsqueeze(-1).expand(-1, -1, D), grad))
    variants = {"cuda": lambda: torch.ops.alast.gather_tokens_backward(grad, idx, N), "copy": lambda: dst.copy_(src),
                "torch_scatter_add": zeros_index_add}
    row = _compare(benchmark, "gather_tokens_backward_bfloat16", variants, moved)
    if row:
        row["fraction_of_copy"] = row["copy"]["us"] / row["cuda"]["us"]


def test_cls_scores(benchmark, cuda, triton_ops, dtype=torch.bfloat16):
    x = torch.randn(B, N, D, device="cuda", dtype=dtype)
    w, b = torch.randn(3 * D, D, device="cuda", dtype=dtype) * D ** -0.5, torch.zeros(3 * D, device="cuda", dtype=dtype)
    nw, nb = torch.ones(D, device="cuda", dtype=dtype), torch.zeros(D, device="cuda", dtype=dtype)
    args = (nw, nb, w, b, H, 1e-6, (D // H) ** -0.5, None, None)
    variants = {"cuda": lambda: cuda.cls_scores(x, *args), "reference": lambda: reference.cls_scores(x, *args)}
    if "cls_scores" in triton_ops:
        variants["triton"] = lambda: triton_ops["cls_scores"](x, *args)
    _compare(benchmark, "cls_scores_bfloat16", variants, x.numel() * x.element_size())
