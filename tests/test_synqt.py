"""``synqt``: forward against a float64 re-derivation, converted models, the triton backend, gradcheck
of the query path, sizes and options."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

import _naive
import alast_kernels as ak
from frozen_testing import TINY_CONFIGS, create, gradcheck_trainable, images, perturb_trainable, tiny_vit
from triton_testing import assert_flash_rule, triton_forced  # noqa: F401


@pytest.mark.parametrize("config", TINY_CONFIGS)
def test_forward_matches_rederivation(config):
    method = create("synqt", tiny_vit(**TINY_CONFIGS[config]))
    perturb_trainable(method)
    x = images(3)
    got = method.model(x)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _naive.synqt_logits(method.model, x), rtol=1e-4, atol=1e-4)


def test_converted_blocks_give_the_same_logits():
    """An ak.ViTBlock projects without calling attn.qkv, so the keys/values come from the fallback path."""
    plain = create("synqt", tiny_vit(reg_tokens=2))
    perturb_trainable(plain)
    converted = create("synqt", ak.convert(tiny_vit(reg_tokens=2)))
    converted.model.load_state_dict(plain.model.state_dict())
    x = images(3)
    torch.testing.assert_close(converted.model(x), plain.model(x), rtol=1e-5, atol=1e-5)


def test_triton_backend_matches_reference(triton_forced):
    """The query attention runs the Triton kernel (interpreter on the CPU): logits and every trainable
    gradient within the flash-attention rule of the float32 reference, both against a float64 run."""
    method = create("synqt", tiny_vit(reg_tokens=2))
    perturb_trainable(method)
    exact_model = copy.deepcopy(method.model).double()
    x = images(2)

    def run(model, dtype):
        out = model(x.to(dtype))
        params = [p for p in model.parameters() if p.requires_grad]
        return [out, *torch.autograd.grad(out.square().sum(), params)]

    ours = run(method.model, torch.float32)
    ak.set_backend("reference")
    reference = run(method.model, torch.float32)
    exact = run(exact_model, torch.float64)
    for i, (a, r, e) in enumerate(zip(ours, reference, exact)):
        assert_flash_rule("logits" if i == 0 else f"grad {i}", a, r, e, slack=1e-6)


def test_gradcheck_query_path():
    """Every trainable parameter's gradient against finite differences, float64, tiny model."""
    vit = tiny_vit(img_size=16, embed_dim=16, num_heads=2, depth=2, num_classes=3, reg_tokens=1,
                   qk_norm=True).double()
    method = create("synqt", vit, num_queries=3, hidden=2, rank=2)
    perturb_trainable(method)
    assert gradcheck_trainable(method, images(2, size=16, dtype=torch.float64))


def test_trainable_size_on_vit_base():
    """The parameter count the architecture implies (about 2.6 M on ViT-B/16 with 100 classes)."""
    with torch.device("meta"):
        method = create("synqt", timm.create_model("vit_base_patch16_224", num_classes=100))
    D, L, T, h, r, C = 768, 12, 4, 48, 8, 100
    mlp = D * h + h + h * D + D
    per_layer = T * D + 2 * mlp + 4 * 2 * D * r + 2
    head = 2 * D + mlp + (D * 3 * L + 3 * L) + 2 * D + (D * C + C)
    assert method.num_trainable() == L * per_layer + (L - 1) + head
    assert 2.5e6 < method.num_trainable() < 2.7e6


def test_post_norm_blocks_refused():
    with pytest.raises(NotImplementedError, match=r"^blocks\[0\]: SynQT needs timm's Block"):
        create("synqt", tiny_vit(block_fn=ResPostBlock))


@pytest.mark.parametrize("option, value", [("num_queries", 0), ("num_queries", 129), ("hidden", 0),
                                           ("rank", 193), ("rank", 1.5)])
def test_bad_options_named(option, value):
    with pytest.raises(ValueError, match=f"^{option}:"):
        create("synqt", tiny_vit(), **{option: value})


@pytest.mark.parametrize("hook", ["backward", "global"])
def test_a_qkv_that_any_hook_observes_is_called_as_a_module(hook):
    """The one fusion rule (alast_kernels.fusion.may_fuse): a backward hook on qkv, or a global module hook,
    keeps SynQT from projecting the queries with qkv's weight directly; qkv is called on the queries, the
    hook sees that call, and the logits are unchanged."""
    method = create("synqt", tiny_vit())
    perturb_trainable(method)
    qkv = method.vit.blocks[1].attn.qkv
    x = images(2)
    want = method.model(x)
    seen = []
    if hook == "backward":
        handle = qkv.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].shape))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: seen.append(out.shape) if module is qkv else None)
    try:
        got = method.model(x)
        got.sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (2, method.num_queries, 3 * method.vit.embed_dim) in seen  # qkv's call on the queries


def test_wrapped_qkv_is_called_as_a_module():
    """A qkv that is not a plain nn.Linear (here one with a forward hook that scales its output) is called,
    not bypassed: the queries and the keys/values both see what the module returns."""
    plain = create("synqt", tiny_vit())
    perturb_trainable(plain)
    hooked = create("synqt", tiny_vit())
    hooked.model.load_state_dict(plain.model.state_dict())
    for block in hooked.vit.blocks:
        block.attn.qkv.register_forward_hook(lambda module, args, out: out * 1.5)
        block.attn.qkv.weight.data /= 1.5  # the hook undoes it: the same projections, if the hook runs
        block.attn.qkv.bias.data /= 1.5
    x = images(2)
    torch.testing.assert_close(hooked.model(x), plain.model(x), rtol=1e-5, atol=1e-5)
