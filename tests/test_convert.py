"""``convert``/``restore`` on timm models: ViT-Ti/S/B, DeiT (distilled: two prefix tokens) and a
register-token model, at small image sizes to stay fast (random weights: ``pretrained=False``)."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from alast_kernels import BlockPlan, ViTBlock, convert, restore


MODELS = {
    # name: (timm model, image size, prefix tokens)
    "vit_tiny": ("vit_tiny_patch16_224", 32, 1),
    "vit_small": ("vit_small_patch16_224", 32, 1),
    "vit_base": ("vit_base_patch16_224", 32, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", 32, 2),
    "registers": ("vit_small_patch14_reg4_dinov2", 28, 5),
}
_cache = {}


def unconverted(name):
    """A fresh copy of the (seeded, randomly initialised) timm model ``name``."""
    if name not in _cache:
        torch.manual_seed(0)
        timm_name, size, _ = MODELS[name]
        _cache[name] = timm.create_model(timm_name, pretrained=False, img_size=size, num_classes=7)
    return copy.deepcopy(_cache[name])


def images(name, batch=2):
    size = MODELS[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def tiny(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5,
                             **kwargs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip(name):
    model = unconverted(name)
    model.train()
    model.blocks[1].eval()  # a mixed mode must survive as well
    modes = {n: m.training for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(name)
    model.eval()
    with torch.no_grad():
        want = model(x)
    model.train()
    model.blocks[1].eval()

    assert convert(model) is model
    assert all(type(blk) is ViTBlock for blk in model.blocks)
    assert all(blk.num_prefix_tokens == MODELS[name][2] == model.num_prefix_tokens for blk in model.blocks)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    model.eval()  # eval mode: every token and layer, the unconverted model's output
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max().item() <= 1e-5

    assert restore(model) is model
    assert all(type(blk) is Block for blk in model.blocks)
    assert not any(hasattr(blk, "alast_plan") or hasattr(blk, "num_prefix_tokens") for blk in model.blocks)
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert (model(x) - want).abs().max().item() <= 1e-5


def test_training_mode_without_plan_equals_unconverted():
    ref = tiny(qkv_bias=True, reg_tokens=2)
    model = convert(copy.deepcopy(ref))
    x = torch.randn(3, 3, 32, 32)
    y_ref, y = ref(x), model(x)
    assert (y - y_ref).abs().max().item() <= 1e-5
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (n, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        assert (p.grad - p_ref.grad).abs().max().item() <= 1e-5, n


def test_dtype_and_device_kept():
    model = tiny().to(torch.float64)
    ref = copy.deepcopy(model).eval()
    convert(model).eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-12

    meta = convert(tiny().to("meta"))
    assert all(type(blk) is ViTBlock for blk in meta.blocks)
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_hooks_kept_and_convert_idempotent():
    model = tiny()
    seen = []
    model.blocks[2].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    convert(model)
    model.blocks[0].alast_plan = BlockPlan(0.5)
    convert(model)  # converting again leaves converted blocks (and their state) alone
    assert model.blocks[0].alast_plan == BlockPlan(0.5)
    model.blocks[0].alast_plan = None
    model(torch.randn(1, 3, 32, 32))
    assert seen == ["ViTBlock"]
    restore(model)
    restore(model)
    model(torch.randn(1, 3, 32, 32))
    assert seen == ["ViTBlock", "Block"]


def test_vit_block_as_timm_block_fn():
    """timm builds a model of ViTBlocks itself; convert then only sets the prefix count."""
    ref = tiny(reg_tokens=2, qkv_bias=True)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5,
                              reg_tokens=2, qkv_bias=True, block_fn=ViTBlock)
    model.load_state_dict(ref.state_dict())
    assert convert(model) is model and all(blk.num_prefix_tokens == 3 for blk in model.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-5


def test_register_tokens_are_prefix_tokens_kept_by_every_plan():
    model = convert(tiny(reg_tokens=4))
    blk = model.blocks[0]
    assert blk.num_prefix_tokens == 5
    blk.alast_plan = BlockPlan(keep_ratio=0.25)  # 4 of the 16 patches
    captured = {}
    blk.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach(), y=o.detach()))
    model(torch.randn(2, 3, 32, 32))
    changed = (captured["y"] != captured["x"]).any(-1)  # (B, N): tokens the block processed
    assert bool(changed[:, :5].all())  # class token and the 4 registers
    assert changed[:, 5:].sum(1).tolist() == [4, 4]


def test_non_block_blocks_raise_and_leave_the_model_alone():
    with pytest.raises(NotImplementedError, match="ResPostBlock"):
        convert(tiny(block_fn=ResPostBlock))
    mixed = tiny()
    mixed.blocks[2] = ResPostBlock(48, 3)
    with pytest.raises(NotImplementedError, match=r"blocks\[2\]"):
        convert(mixed)
    assert type(mixed.blocks[0]) is Block  # nothing converted half-way


class _OtherAttention(Attention):
    pass


def test_block_with_another_attention_raises():
    model = tiny()
    model.blocks[1].attn.__class__ = _OtherAttention
    with pytest.raises(NotImplementedError, match="attn_layer"):
        convert(model)
    assert all(type(blk) is Block for blk in model.blocks)


def test_not_a_vision_transformer_raises():
    with pytest.raises(TypeError, match="model"):
        convert(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="model"):
        restore(nn.Sequential())
