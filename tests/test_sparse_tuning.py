"""``sparse_tuning``: the forward against an independent derivation (tests/_naive.py), which parameters
train and which never change, tokens per block, the head option, state, wrappers, options, and on ViT-B
the token counts and the forward FLOP ratio."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import _naive as naive
import alast_kernels as ak
from alast_kernels.measure import count_flops
from alast_kernels.methods.sparse_tuning import DenseAdapter
from token_fuse_testing import images, snapshot, tiny_vit, token_counts, train

pytestmark = pytest.mark.usefixtures("reference_backend")


def _randomise(module, seed=1, std=0.1):
    """Random values for every parameter of ``module`` (W_up starts at zero, which would hide the adapters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)


@pytest.mark.parametrize("reg_tokens", [0, 2])
@pytest.mark.parametrize("links", [(1, 3), (), (2,)])
def test_forward_matches_derivation(reg_tokens, links):
    vit = tiny_vit(reg_tokens, dtype=torch.float64)
    method = ak.methods.create("sparse_tuning", vit, dense_links=links)
    _randomise(method.model.adapters)
    x = images(dtype=torch.float64)
    want = naive.token_fuse_vit(vit, x, (1, 2, 3), 0.7, method.model.adapters, links)
    for mode in ("train", "eval"):  # inference runs the same fuse
        getattr(method.model, mode)()
        torch.testing.assert_close(method.model(x), want, rtol=1e-9, atol=1e-10)


def test_starts_as_the_backbone_with_the_token_fuse():
    vit = tiny_vit(dtype=torch.float64)
    x = images(dtype=torch.float64)
    plain = vit(x)
    method = ak.methods.create("sparse_tuning", vit)
    torch.testing.assert_close(method.model(x), naive.token_fuse_vit(vit, x, (1, 2, 3), 0.7), rtol=1e-9,
                               atol=1e-10)
    no_fuse = ak.methods.create("sparse_tuning", vit, keep_rate=1.0)
    torch.testing.assert_close(no_fuse.model(x), plain, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(method.model(x), plain)  # the fuse does change the result


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_tokens_per_block_are_progressive(reg_tokens):
    vit = tiny_vit(reg_tokens)
    method = ak.methods.create("sparse_tuning", vit)
    P = 1 + reg_tokens
    # Fuse at blocks 1, 2, 3 (round(4/4)·{1,2,3}); each keeps ceil(0.7·(N−P)) and adds one fused token.
    n, block, mlp = 16 + P, [], []
    for layer in range(4):
        block.append(n)
        if layer in (1, 2, 3):
            n = P + math.ceil(0.7 * (n - P)) + 1
        mlp.append(n)
    assert method.model.fuse_layers == (1, 2, 3)
    for mode in ("train", "eval"):
        getattr(method.model, mode)()
        with token_counts(vit) as counts:
            method.model(images())
        assert counts == {"block": block, "mlp": mlp}
    assert block == [16 + P, 16 + P, P + 12 + 1, P + 10 + 1]


def test_only_adapters_and_head_train_and_the_rest_never_changes():
    vit = tiny_vit()
    method = ak.methods.create("sparse_tuning", vit)
    model = method.model
    head_names = {f"vit.{n}" for n, _ in vit.named_parameters() if n.split(".")[0] in ("norm", "fc_norm", "head")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_names = {n for n, _ in model.named_parameters() if n.startswith("adapters.")}
    assert trainable == adapter_names | head_names
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for n, p in model.named_parameters()
                                                              if n in trainable}

    F.cross_entropy(model(images()), torch.tensor([0, 1, 2])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in trainable), n
    model.zero_grad(set_to_none=True)

    before = snapshot(model)
    train(method, steps=3)
    after = snapshot(model)
    for n in before:
        if n in trainable:
            assert not torch.equal(before[n], after[n]), f"{n} did not train"
        else:
            assert torch.equal(before[n], after[n]), f"{n} changed"


def test_trainable_parameter_count():
    vit = tiny_vit()
    method = ak.methods.create("sparse_tuning", vit, adapter_dim=8)
    D, r = 192, 8
    links_per_block = [0, 1, 1, 2]  # links 1 and 3 where that block exists
    adapters = sum(D * r + r + k * D * r + r * D + D for k in links_per_block)
    head = 2 * D + (D * 5 + 5)  # final LayerNorm and classifier
    assert method.num_trainable() == adapters + head


def test_adapters_start_at_zero_output():
    adapter = DenseAdapter(12, 4, (1, 3))
    x, h1, h3 = (torch.randn(2, 5, 12) for _ in range(3))
    assert torch.equal(adapter(x, [h3, torch.randn(2, 5, 12), h1]), torch.zeros(2, 5, 12))
    assert len(adapter.link_down) == 2 and all(lin.bias is None for lin in adapter.link_down)


def test_head_batchnorm_option():
    vit = tiny_vit(dtype=torch.float64)
    method = ak.methods.create("sparse_tuning", vit, head_batchnorm=True)
    norm = method.model.head_norm
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and not list(norm.parameters())
    x = images(batch=4, dtype=torch.float64)
    # The BatchNorm sits between the pooled features and the classifier: logits are affine in its output.
    feats = []
    handle = vit.head.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    method.model.train()
    logits = method.model(x)
    handle.remove()
    torch.testing.assert_close(feats[0].mean(0), torch.zeros(192, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(logits, feats[0] @ vit.head.weight.T + vit.head.bias)
    assert norm.num_batches_tracked.item() == 1
    assert norm.running_mean.abs().sum() > 0


def test_state_round_trip():
    method = ak.methods.create("sparse_tuning", tiny_vit())
    train(method, steps=2)
    state, weights = method.state_dict(), method.model.state_dict()
    other = ak.methods.create("sparse_tuning", tiny_vit(seed=5))
    other.load_state_dict(state)
    other.model.load_state_dict(weights)
    method.model.eval()
    other.model.eval()
    x = images(seed=3)
    assert torch.equal(method.model(x), other.model(x))
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict({"method": "evit"})


def test_a_wrapped_model_with_lora_layers_is_computed_through_them():
    peft = pytest.importorskip("peft")
    vit = tiny_vit(dtype=torch.float64)
    wrapped = peft.get_peft_model(vit, peft.LoraConfig(r=4, target_modules=["qkv"]))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.1)  # LoRA's B starts at zero; make it matter
    method = ak.methods.create("sparse_tuning", wrapped)
    assert method.vit is vit
    _randomise(method.model.adapters)
    x = images(dtype=torch.float64)
    want = naive.token_fuse_vit(vit, x, (1, 2, 3), 0.7, method.model.adapters)  # calls qkv as a module
    torch.testing.assert_close(method.model(x), want, rtol=1e-9, atol=1e-10)
    assert not any(p.requires_grad for n, p in method.model.named_parameters() if "lora_" in n)


def test_ddp_after_creation(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        method = ak.methods.create("sparse_tuning", tiny_vit())
        ddp = nn.parallel.DistributedDataParallel(method.model)
        for _ in range(2):  # a parameter left out of a forward would fail the second backward
            F.cross_entropy(ddp(images()), torch.tensor([0, 1, 2])).backward()
        assert all(p.grad is not None for p in method.trainable_parameters())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("option, value", [
    ("keep_rate", 0.0), ("keep_rate", 1.5), ("keep_rate", "0.7"), ("fuse_layers", (1, 4)), ("fuse_layers", (2, 2)),
    ("fuse_layers", 3), ("adapter_dim", 0), ("adapter_dim", 2.0), ("dense_links", (0,)), ("dense_links", (1, 1)),
])
def test_bad_options_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=f"^{option}:"):
        ak.methods.create("sparse_tuning", tiny_vit(), **{option: value})


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="keep_ratio"):
        ak.methods.create("sparse_tuning", tiny_vit(), keep_ratio=0.5)


def test_default_fuse_layers_for_other_depths():
    from alast_kernels.methods.token_fuse import default_fuse_layers
    assert default_fuse_layers(12) == (3, 6, 9)
    assert default_fuse_layers(24) == (6, 12, 18)
    assert default_fuse_layers(6) == (2, 4)  # 6/4 = 1.5 rounds up to 2; block 6 does not exist
    assert default_fuse_layers(4) == (1, 2, 3)
    assert default_fuse_layers(1) == (0,)


def test_vit_base_tokens_and_forward_flops():
    """docs/methods/sparse-tuning.md: ViT-B/16 at 224², tokens entering the blocks 197 -> 140 -> 100 -> 72
    and forward FLOPs 0.66–0.68 of the plain model's, adapters included."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", num_classes=100).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain = count_flops(lambda: vit(x))
        method = ak.methods.create("sparse_tuning", vit)
        method.model.eval()
        with token_counts(vit) as counts:
            fused = count_flops(lambda: method.model(x))
    assert counts["block"] == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert 0.66 <= fused / plain <= 0.68, fused / plain
    D, r = 768, 32
    links = sum(min(layer, 1) + (layer >= 3) for layer in range(12))  # links 1 and 3 where they exist
    adapters = 12 * (D * r + r + r * D + D) + links * D * r
    assert method.num_trainable() == adapters + 2 * D + D * 100 + 100  # + final norm and the 100-way head
