"""Every Triton kernel, forward and backward, at ViT-B/16 shapes against the reference: B=2 images of N=197
tokens, D=768 channels, 12 heads of 64, 99 kept tokens, a 3072-wide MLP, 138 tokens kept by a fuse, 4
queries over all tokens — with the launchers' real block
sizes and tiles for these widths (masks, loops over channel blocks, per-program partial sums; the attention
kernels with their GPU tiles, not the interpreter's small ones) rather than the tiny shapes of the other triton tests.
Without a GPU they run under the interpreter (float32); marked ``vitb`` (``pytest -m vitb``; docs/test-suite.md
says how long they take).
"""
import importlib

import pytest
import torch

from triton_testing import DEVICE, REFERENCE_OPS, TRITON_OPS, grads, nan_outputs  # noqa: F401

pytestmark = pytest.mark.vitb


@pytest.fixture(autouse=True)
def _gpu_tiles(monkeypatch):
    for name in ("attention", "query_attention"):
        monkeypatch.setattr(importlib.import_module(f"alast_kernels.backends.triton.{name}"), "INTERPRETER_BLOCK",
                            None)


B, N, D, H, K, F = 2, 197, 768, 12, 99, 3072
Dh = D // H
DTYPE = torch.float32


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(197)


def _leaf(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DTYPE).to(DEVICE).requires_grad_()


def _kept(gen):
    """The class token and the 98 best of 196 patches, as a planned block keeps them."""
    patches = torch.stack([torch.randperm(N - 1, generator=gen)[:K - 1].sort().values + 1 for _ in range(B)])
    return torch.cat([torch.zeros(B, 1, dtype=torch.int64), patches], dim=1).to(DEVICE)


def _assert_grads_close(got, want, rtol=1e-5, atol=1e-5):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_select_tokens(nan_outputs, gen):
    scores = torch.rand(B, N, generator=gen).softmax(dim=1).to(DEVICE)
    scores[:, 5::7] = scores[:, 6::7][:, :scores[:, 5::7].shape[1]]  # ties across the cut
    assert torch.equal(TRITON_OPS["select_tokens"](scores, K - 1, 1), REFERENCE_OPS["select_tokens"](scores, K - 1, 1))


def test_gather_and_scatter_tokens(nan_outputs, gen):
    x, idx = _leaf(B, N, D, gen=gen), _kept(gen)
    got, want = TRITON_OPS["gather_tokens"](x, idx), REFERENCE_OPS["gather_tokens"](x, idx)
    assert torch.equal(got, want)
    g = torch.randn(B, K, D, generator=gen).to(DEVICE)
    assert torch.equal(grads(got, [x], g)[0], grads(want, [x], g)[0])
    delta = _leaf(B, K, D, gen=gen)
    got, want = TRITON_OPS["scatter_tokens"](x, idx, delta), REFERENCE_OPS["scatter_tokens"](x, idx, delta)
    assert torch.equal(got, want)
    g = torch.randn(B, N, D, generator=gen).to(DEVICE)
    for a, b in zip(grads(got, [x, delta], g), grads(want, [x, delta], g)):
        assert torch.equal(a, b)


def test_gather_layer_norm(nan_outputs, gen):
    x, idx = _leaf(B, N, D, gen=gen), _kept(gen)
    w, b = _leaf(D, gen=gen, scale=0.5), _leaf(D, gen=gen, scale=0.1)
    got = TRITON_OPS["gather_layer_norm"](x, idx, w, b, 1e-6)
    want = REFERENCE_OPS["gather_layer_norm"](x, idx, w, b, 1e-6)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    g = tuple(torch.randn(B, K, D, generator=gen).to(DEVICE) for _ in range(2))
    _assert_grads_close(grads(got, [x, w, b], g), grads(want, [x, w, b], g), rtol=1e-5, atol=1e-4)


def test_cls_scores(nan_outputs, gen):
    x = _leaf(B, N, D, gen=gen, scale=2.0)
    args = (1 + 0.1 * torch.randn(D, generator=gen), 0.1 * torch.randn(D, generator=gen),
            torch.randn(3 * D, D, generator=gen) * D ** -0.5, 0.1 * torch.randn(3 * D, generator=gen))
    args = tuple(a.to(DEVICE) for a in args) + (H, 1e-6, Dh ** -0.5, None, None)
    got, want = TRITON_OPS["cls_scores"](x, *args), REFERENCE_OPS["cls_scores"](x, *args)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)


def test_attention_with_class_row(nan_outputs, gen):
    qkv = _leaf(B, N, 3, H, Dh, gen=gen)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as the block makes them
    got, got_cls = TRITON_OPS["attention"](q, k, v, Dh ** -0.5, True)
    want, want_cls = REFERENCE_OPS["attention"](q, k, v, Dh ** -0.5, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cls, want_cls, rtol=1e-5, atol=1e-6)
    g = torch.randn(B, H, N, Dh, generator=gen).to(DEVICE)
    _assert_grads_close(grads(got, [qkv], g), grads(want, [qkv], g), rtol=1e-4, atol=1e-5)


def test_fuse_tokens(nan_outputs, gen):
    """Sparse-Tuning's fuse at keep rate 0.7: 138 of 196 patches kept, the other 58 folded into one."""
    x = _leaf(B, N, D, gen=gen)
    scores = torch.rand(B, N, generator=gen).softmax(dim=1).to(DEVICE)
    got, want = TRITON_OPS["fuse_tokens"](x, scores, 138, 1), REFERENCE_OPS["fuse_tokens"](x, scores, 138, 1)
    assert torch.equal(got[:, :-1], want[:, :-1])
    torch.testing.assert_close(got[:, -1], want[:, -1], rtol=1e-5, atol=1e-6)
    g = torch.randn(B, 140, D, generator=gen).to(DEVICE)
    _assert_grads_close(grads(got, [x], g), grads(want, [x], g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_grad", [False, True])
def test_query_attention(nan_outputs, gen, kv_grad):
    """SynQT's read-out: 4 queries per head over all 197 tokens' keys and values."""
    q = _leaf(B, H, 4, Dh, gen=gen)
    kv = _leaf(B, 2, H, N, Dh, gen=gen).requires_grad_(kv_grad)
    k, v = kv[:, 0], kv[:, 1]
    got, want = (ops["query_attention"](q, k, v, Dh ** -0.5) for ops in (TRITON_OPS, REFERENCE_OPS))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(B, H, 4, Dh, generator=gen).to(DEVICE)
    inputs = [q, kv] if kv_grad else [q]
    _assert_grads_close(grads(got, inputs, g), grads(want, inputs, g), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_masked_mlp(nan_outputs, gen, train):
    x = _leaf(B, N, D, gen=gen)
    params = [_leaf(F, D, gen=gen, scale=D ** -0.5), _leaf(F, gen=gen, scale=0.1),
              _leaf(D, F, gen=gen, scale=F ** -0.5), _leaf(D, gen=gen, scale=0.1)]
    got = TRITON_OPS["masked_mlp"](x, *params, train, "tanh")
    want = REFERENCE_OPS["masked_mlp"](x, *params, train, "tanh")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(B, N, D, generator=gen).to(DEVICE)
    inputs = [x] + (params if train else [])
    _assert_grads_close(grads(got, inputs, g), grads(want, inputs, g), rtol=1e-4, atol=1e-4)
