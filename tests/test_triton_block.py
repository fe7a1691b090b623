"""A converted ViTBlock with a plan: the triton backend (forced) matches the reference backend."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import alast_kernels
from alast_kernels import BlockPlan
from triton_testing import DEVICE, TRITON_OPS


def _block(gen_seed: int):
    torch.manual_seed(gen_seed)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=2, mlp_ratio=1.5,
                              num_classes=0)
    alast_kernels.convert(model)
    block = model.blocks[0].to(DEVICE).train()
    with torch.no_grad():  # non-trivial LayerNorm affines and LayerScale-free defaults
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return block


def _step(block, x, backend):
    alast_kernels.set_backend(backend)
    try:
        x = x.detach().requires_grad_()
        out = block(x)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out).to(DEVICE))
    finally:
        alast_kernels.set_backend("auto")
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}, block.alast_keep, \
        block.alast_importance


def _assert_step_matches(got, ref, train):
    """Output, input gradient, class-token update and parameter gradients (none for a frozen block) of a
    triton step against the reference's."""
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[4], ref[4], rtol=1e-5, atol=1e-6)
    for name, r in ref[2].items():
        if not train:
            assert got[2][name] is None and r is None, name
        else:
            torch.testing.assert_close(got[2][name], r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("train", [True, False])
def test_planned_block_matches_reference(train, monkeypatch):
    calls = []
    for name, fn in list(TRITON_OPS.items()):  # record which triton ops the block really runs
        monkeypatch.setitem(TRITON_OPS, name, lambda *a, _n=name, _f=fn: calls.append(_n) or _f(*a))
    block = _block(0)
    block.alast_plan = BlockPlan(keep_ratio=0.45, train=train)
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_block = copy.deepcopy(block)
    ref = _step(ref_block, x, "reference")
    got = _step(block, x, "triton")
    assert set(calls) == {"cls_scores", "select_tokens", "gather_layer_norm", "masked_linear", "attention",
                          "masked_mlp", "scatter_tokens"}
    assert got[3] == ref[3] == 8  # ceil(0.45 · 16) patch tokens kept
    _assert_step_matches(got, ref, train)


@pytest.mark.parametrize("train", [True, False])
def test_planned_drop_block_matches_reference(train, monkeypatch):
    """Drop mode: the tokens passed on come from the attention kernel's own class-token row — no scoring
    pass, no scatter back."""
    calls = []
    for name, fn in list(TRITON_OPS.items()):
        monkeypatch.setitem(TRITON_OPS, name, lambda *a, _n=name, _f=fn: calls.append(_n) or _f(*a))
    block = _block(0)
    block.alast_plan = BlockPlan(keep_ratio=0.45, train=train, num_patches=16, tokens="drop")
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = _step(copy.deepcopy(block), x, "reference")
    got = _step(block, x, "triton")
    assert "cls_scores" not in calls and "scatter_tokens" not in calls
    assert {"attention", "select_tokens", "gather_tokens"} <= set(calls)
    assert got[0].shape == ref[0].shape == (2, 1 + 8, 64)  # ceil(0.45 · 16) patch tokens passed on
    assert got[3] == ref[3] == 16  # it processed every token
    _assert_step_matches(got, ref, train)
