"""ALaST with LoRA: Hugging Face peft in both orders, loralib's ``nn.Linear`` subclass, hooked modules.

Whatever wraps ``qkv``/``proj``/``fc1``/``fc2`` must be computed and trained: the eval output equals the plain
timm model with the same adapters, LoRA parameters get gradients exactly in the trained blocks (base weights
never), and a ``fixed`` plan with every token and every block gives plain timm + peft's gradients.
"""
import copy

import loralib
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from timm.models.vision_transformer import Block, VisionTransformer

import _naive as naive
import alast_kernels as ak
from alast_kernels import BlockPlan, ViTBlock, ops

pytestmark = pytest.mark.usefixtures("reference_backend")

L, NP = 4, 16
TARGETS = [["qkv"], ["proj"], ["fc1"], ["fc2"], ["qkv", "proj", "fc1", "fc2"]]


def tiny(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=L, num_heads=3, num_classes=5,
                             qkv_bias=True)


def lora_config(targets):
    # init_lora_weights=False: both LoRA factors random, so the adapters change the output from the start.
    # A pattern, so that "proj" means the blocks' attention projection and not patch_embed.proj.
    pattern = rf".*blocks\.\d+\.(attn|mlp)\.({'|'.join(targets)})" if isinstance(targets, list) else targets
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=pattern, modules_to_save=["head"],
                      init_lora_weights=False)


def batch(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def with_lora(targets, order, seed=0):
    """(plain timm + peft, converted model + peft) with identical weights and adapters."""
    if order == "convert_then_peft":
        model = get_peft_model(ak.convert(tiny(seed)), lora_config(targets))
    else:  # peft first, then ALaST finds the ViT inside the PeftModel
        model = get_peft_model(tiny(seed), lora_config(targets))
    plain = get_peft_model(tiny(seed), lora_config(targets))
    model.load_state_dict(plain.state_dict())
    return plain, model


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("targets", TARGETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("order", ["convert_then_peft", "peft_then_alast"])
def test_eval_and_full_plan_equal_plain_timm_with_peft(targets, order):
    plain, model = with_lora(targets, order)
    ctrl = ak.ALaST(model, policy="fixed", keep_ratios=[1.0] * L, train=[True] * L)
    assert all(type(b) is ViTBlock for b in ctrl.blocks)
    x, y = batch()
    plain.eval(), model.eval()
    with torch.no_grad():
        want = plain(x)
        assert (model(x) - want).abs().max().item() <= 1e-5
        # The adapters matter: without them the output differs, so the comparison above can fail.
        with plain.disable_adapter():
            assert (plain(x) - want).abs().max().item() > 1e-3

    plain.train(), model.train()
    F.cross_entropy(plain(x), y).backward()
    with ctrl.step():
        F.cross_entropy(model(x), y).backward()
    want_grads, got_grads = lora_params(plain), lora_params(model)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) == 2 * L * len(targets)
    for name, p in got_grads.items():
        assert p.grad is not None, name
        assert (p.grad - want_grads[name].grad).abs().max().item() <= 1e-5, name
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("targets", TARGETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("tokens,keep_ratios", [("carry", [0.5] * L), ("drop", [1.0, 0.75, 0.5, 0.5])])
def test_lora_trains_exactly_in_the_trained_blocks(targets, tokens, keep_ratios):
    _, model = with_lora(targets, "peft_then_alast")
    train = [False, True, False, True]
    ctrl = ak.ALaST(model, policy="fixed", keep_ratios=keep_ratios, train=train, tokens=tokens)
    x, y = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ctrl.step():
        F.cross_entropy(model(x), y).backward()
    for name, p in lora_params(model).items():
        block = int(name.split("blocks.")[1].split(".")[0])
        assert (p.grad is not None) == train[block], name
    base = [n for n, p in model.named_parameters() if "lora_" not in n and "head" not in n]
    assert base and all(model.get_parameter(n).grad is None for n in base)
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        if "lora_" in name:
            assert moved == train[int(name.split("blocks.")[1].split(".")[0])], name
        elif "head" not in name:
            assert not moved, name


def _lora_block_pair():
    """A timm ``Block`` whose qkv and fc1 are peft LoRA layers, the same block as a ``ViTBlock``, an input
    ``(2, 14, 36)`` and the float64 class-token scores ``(2, 14)`` through the adapted qkv (every key
    projected, as the block computes them)."""
    torch.manual_seed(0)
    ref = Block(36, 3, qkv_bias=True)
    inject_adapter_in_model(lora_config(r"(attn\.qkv|mlp\.fc1)"), ref)
    blk = copy.deepcopy(ref)
    blk.__class__ = ViTBlock
    blk.init_alast()
    x = torch.randn(2, 14, 36, requires_grad=True)
    with torch.no_grad():
        qkv = ref.attn.qkv(ref.norm1(x)).view(2, 14, 3, 3, 12)
        logits = torch.einsum("bhd,bhnd->bhn", qkv[:, 0, 0].double(), qkv[:, :, 1].transpose(1, 2).double())
        scores = naive.softmax(logits * ref.attn.scale).mean(dim=1)
    return ref, blk, x, scores


def test_selection_on_a_lora_block_equals_timm_on_the_gathered_tokens():
    """A planned block whose qkv and fc1 are peft LoRA layers: scores, kept tokens and gradients."""
    ref, blk, x, scores = _lora_block_pair()
    keep = 6
    idx = naive.select_tokens(scores, keep, 1)
    assert torch.equal(ops.select_tokens(blk.token_scores(x), keep, 1), idx)

    blk.train()
    blk.alast_plan = BlockPlan(keep / 13)
    out = blk(x)
    rows = torch.arange(2).unsqueeze(1)
    x_ref = x.detach().clone().requires_grad_(True)
    want = x_ref.index_put((rows, idx), ref(x_ref[rows, idx]))
    assert (out - want).abs().max().item() <= 1e-5
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-5
    for (name, p), (_, p_ref) in zip(blk.named_parameters(), ref.named_parameters()):
        if p_ref.requires_grad:
            assert p.grad is not None and (p.grad - p_ref.grad).abs().max().item() <= 1e-5, name


def test_drop_mode_on_a_lora_block_equals_timm_then_its_top_tokens():
    """Drop mode on a block whose qkv and fc1 are peft LoRA layers: the tokens passed on are ranked by the
    block's own (adapted) attention, and the adapters get timm's gradients."""
    ref, blk, x, scores = _lora_block_pair()
    keep = 6
    idx = naive.select_tokens(scores, keep, 1)
    blk.train()
    blk.alast_plan = BlockPlan(keep / 13, num_patches=13, tokens="drop")
    out = blk(x)
    x_ref = x.detach().clone().requires_grad_(True)
    want = ref(x_ref)[torch.arange(2).unsqueeze(1), idx]
    assert out.shape == (2, 1 + keep, 36) and (out - want).abs().max().item() <= 1e-5
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-5
    lora = [(n, p, q) for (n, p), (_, q) in zip(blk.named_parameters(), ref.named_parameters()) if "lora_" in n]
    assert len(lora) == 4
    for name, p, p_ref in lora:
        assert p.grad is not None and (p.grad - p_ref.grad).abs().max().item() <= 1e-5, name


def _loralib_model():
    """A tiny ViT whose qkv layers are loralib's ``lora.Linear`` (an ``nn.Linear`` subclass)."""
    model = tiny()
    for blk in model.blocks:
        old = blk.attn.qkv
        new = loralib.Linear(old.in_features, old.out_features, r=4, lora_alpha=8, merge_weights=False)
        new.load_state_dict(old.state_dict(), strict=False)
        nn.init.normal_(new.lora_B, std=0.1)
        blk.attn.qkv = new
    loralib.mark_only_lora_as_trainable(model)
    return model


def test_loralib_subclass_of_linear_is_called_as_a_module():
    plain = _loralib_model()
    model = copy.deepcopy(plain)
    ctrl = ak.ALaST(model, policy="fixed", keep_ratios=[1.0] * L, train=[True] * L)
    x, y = batch()
    F.cross_entropy(plain(x), y).backward()
    with ctrl.step():
        F.cross_entropy(model(x), y).backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * L
    for name, p in lora.items():
        assert p.grad is not None, name
        assert (p.grad - plain.get_parameter(name).grad).abs().max().item() <= 1e-5, name


def test_forward_hooks_are_honoured():
    """A hook that changes a module's output must act as it does in timm (so that module is not fused)."""
    plain, model = tiny(), ak.convert(tiny())
    for m in (plain, model):
        for blk in m.blocks:
            blk.attn.proj.register_forward_hook(lambda mod, args, out: out * 0.5)
            blk.mlp.fc1.register_forward_pre_hook(lambda mod, args: (args[0] + 0.1,))
    x, _ = batch()
    plain.eval(), model.eval()
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max().item() <= 1e-5
        unhooked = tiny().eval()(x)
        assert (plain(x) - unhooked).abs().max().item() > 1e-3


def test_alast_lora_method_and_lora_method():
    """The methods layer's ``lora`` and ``alast+lora``: peft adapters, only they and the head train."""
    from alast_kernels import methods

    x, y = batch()
    for name in ("lora", "alast+lora"):
        method = methods.create(name, tiny())
        trainable = {n for n, p in method.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n or "head" in n for n in trainable), name
        method.model.train()
        with method.step():
            F.cross_entropy(method.model(x), y).backward()
        assert all(p.grad is None for p in method.model.parameters() if not p.requires_grad)


def test_alast_trains_the_embeddings_and_alast_lora_leaves_them_to_peft():
    """``alast`` trains what full fine-tuning trains, embeddings included; under ``alast+lora`` peft has frozen
    them, so they stay frozen and nothing below the lowest trained block keeps a graph."""
    from alast_kernels import methods
    from alast_kernels.vit import embedding_parameters

    x, y = batch()
    plain = methods.create("alast", tiny())
    adapted = methods.create("alast+lora", tiny())
    assert plain.controller.train_embeddings and not adapted.controller.train_embeddings
    for method in (plain, adapted):
        method.model.train()
        with method.step():
            F.cross_entropy(method.model(x), y).backward()
    assert all(p.grad is not None for p in embedding_parameters(plain.vit))
    assert all(p.grad is None and not p.requires_grad for p in embedding_parameters(adapted.vit))
