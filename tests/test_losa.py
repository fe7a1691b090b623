"""``losa``: forward against a float64 re-derivation, zero start, ranks and their parameter share,
gradcheck of the side path, options."""
import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

import _naive
from alast_kernels.methods.losa import default_ranks
from frozen_testing import TINY_CONFIGS, create, gradcheck_trainable, images, perturb_trainable, tiny_vit


@pytest.mark.parametrize("config", TINY_CONFIGS)
def test_forward_matches_rederivation(config):
    method = create("losa", tiny_vit(**TINY_CONFIGS[config]))
    perturb_trainable(method)
    x = images(3)
    got = method.model(x)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _naive.losa_logits(method.model, x), rtol=1e-4, atol=1e-4)


def test_any_block_type():
    """LoSA only reads block outputs, so post-norm blocks work too."""
    method = create("losa", tiny_vit(block_fn=ResPostBlock))
    perturb_trainable(method)
    x = images(2)
    torch.testing.assert_close(method.model(x).double(), _naive.losa_logits(method.model, x), rtol=1e-4, atol=1e-4)


def test_starts_as_the_unmodified_vit():
    """Zero-initialised up-projections: before training, the logits are the frozen ViT's own."""
    vit = tiny_vit(reg_tokens=2)
    method = create("losa", vit)
    x = images(4)
    with torch.no_grad():
        expected = vit.eval()(x)
    torch.testing.assert_close(method.model(x), expected, rtol=0, atol=0)


def test_recompute_changes_nothing_but_memory():
    torch.manual_seed(0)
    methods = [create("losa", tiny_vit(), recompute=r) for r in (True, False)]
    methods[1].model.load_state_dict(methods[0].model.state_dict())
    perturb_trainable(methods[0]), perturb_trainable(methods[1])
    x = images(3)
    outs = [m.model(x) for m in methods]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for out in outs:
        out.square().sum().backward()
    for a, b in zip(methods[0].trainable_parameters(), methods[1].trainable_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_gradcheck_side_path():
    """Every trainable parameter's gradient against finite differences, float64, tiny model."""
    vit = tiny_vit(img_size=16, embed_dim=16, num_heads=2, depth=2, num_classes=3, reg_tokens=1).double()
    method = create("losa", vit)
    perturb_trainable(method)
    assert gradcheck_trainable(method, images(2, size=16, dtype=torch.float64))


def test_default_ranks_keep_the_side_network_small():
    """D/16 and N/32: the side network stays within 2% of the backbone on ViT-Ti/S/B and the job's model."""
    for name, options in [("vit_tiny_patch16_224", {}), ("vit_small_patch16_224", {}),
                          ("vit_base_patch16_224", {}), ("vit_tiny_patch16_224",
                                                         dict(img_size=48, patch_size=8, depth=6))]:
        with torch.device("meta"):
            vit = timm.create_model(name, num_classes=100, **options)
            backbone = sum(p.numel() for p in vit.parameters())
            method = create("losa", vit)
        side = sum(p.numel() for p in method.model.side.parameters())
        N, D, L = method.model.num_tokens, vit.embed_dim, len(vit.blocks)
        r, rt = default_ranks(N, D)
        assert (method.rank, method.token_rank) == (r, rt) == (max(2, round(D / 16)), max(2, -(-N // 32)))
        per_layer = 2 * D + (N * rt + rt) + (rt * N + N) + 2 * D + (D * r + r) + (r * D + D)
        assert side == L * per_layer
        assert side <= 0.02 * backbone, (name, side / backbone)


@pytest.mark.parametrize("option, value, error", [
    ("rank", 0, ValueError), ("rank", 193, ValueError), ("rank", 2.0, ValueError), ("token_rank", 18, ValueError),
    ("token_rank", True, ValueError), ("recompute", 1, TypeError),
])
def test_bad_options_named(option, value, error):
    with pytest.raises(error, match=f"^{option}:"):
        create("losa", tiny_vit(), **{option: value})
