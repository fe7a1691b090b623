"""A converted model is a drop-in under the checks timm's own model tests make (its tests/test_models.py:
forward, backward, forward_intermediates, FX tracing, TorchScript), over a few small timm ViTs.

Each check runs on the converted model and on the same model unconverted, and compares them: a converted
model in eval mode (no plan) gives timm's output, scripted or traced too; inside an ALaST step (a plan
applied) scripting and tracing refuse, naming ``ak.restore``.
"""
import copy
import warnings

import pytest
import timm
import torch

import alast_kernels as ak
from alast_kernels import ViTBlock

pytestmark = pytest.mark.usefixtures("reference_backend")

# Small variants of timm models that cover the layouts ViTBlock runs: class token, distillation token,
# register tokens without a class token (average pooling), q/k norm, layer scale.
MODELS = {
    "vit_tiny_patch16_224": {},
    "vit_tiny_patch16_224-qk_norm": {"qk_norm": True},
    "deit_tiny_distilled_patch16_224": {},
    "deit3_small_patch16_224": {"embed_dim": 96, "num_heads": 3},
    "vit_wee_patch16_reg1_gap_256": {},
}
SIZE = 64
CONCRETE = {"attn_mask": None, "is_causal": False}  # the keyword arguments timm's own blocks call with


def _create(key, **extra):
    """The model ``key`` at a test size, created scriptable as timm's TorchScript test creates it."""
    name = key.split("-")[0]
    torch.manual_seed(0)
    with timm.set_scriptable(True):
        return timm.create_model(name, pretrained=False, img_size=SIZE, depth=2, **{**MODELS[key], **extra})


def _pair(key, **extra):
    """``(converted, timm's)``: the same weights, one of them converted."""
    timm_model = _create(key, **extra)
    converted = ak.convert(copy.deepcopy(timm_model))
    assert all(type(b) is ViTBlock for b in converted.blocks)
    return converted, timm_model


def _inputs(batch=2):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still what timm tests
        return torch.jit.script(model)


@pytest.mark.parametrize("key", MODELS)
def test_forward(key):
    converted, timm_model = _pair(key)
    x = _inputs(1)
    with torch.no_grad():
        out = converted.eval()(x)
        assert out.shape == (1, converted.num_classes) and not out.isnan().any()
        assert torch.equal(out, timm_model.eval()(x))


@pytest.mark.parametrize("key", MODELS)
def test_backward(key):
    converted, timm_model = _pair(key, num_classes=42)
    x = _inputs()
    for model in (converted, timm_model):
        model.train()
        model(x).mean().backward()
    for (name, p), (_, q) in zip(converted.named_parameters(), timm_model.named_parameters()):
        assert p.grad is not None, f"no gradient for {name}"
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("key", MODELS)
def test_forward_intermediates(key):
    converted, timm_model = _pair(key)
    x = _inputs()
    with torch.no_grad():
        final, intermediates = converted.eval().forward_intermediates(x)
        want_final, want = timm_model.eval().forward_intermediates(x)
        only = converted.forward_intermediates(x, indices=1, intermediates_only=True)
    assert torch.equal(final, want_final)
    assert len(intermediates) == len(want) == 2 and all(torch.equal(a, b) for a, b in zip(intermediates, want))
    assert len(only) == 1 and torch.equal(only[0], want[-1])


@pytest.mark.parametrize("concrete", [True, False], ids=["concrete_args", "placeholders"])
@pytest.mark.parametrize("key", MODELS)
def test_fx(key, concrete):
    converted, timm_model = _pair(key)
    converted.eval()
    traced = torch.fx.symbolic_trace(converted, concrete_args=CONCRETE if concrete else None)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(traced(x), timm_model.eval()(x))
    # The traced graph is timm's: it calls timm's modules, not the fused ops.
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "blocks.0.attn.qkv" in called and "blocks.1.mlp.fc2" in called


@pytest.mark.parametrize("key", MODELS)
def test_torchscript(key):
    converted, timm_model = _pair(key)
    scripted = _script(converted.eval())
    x = _inputs(1)
    with torch.no_grad():
        out = scripted(x)
        assert out.shape == (1, converted.num_classes) and not out.isnan().any()
        assert torch.equal(out, _script(timm_model.eval())(x))
        torch.testing.assert_close(out, timm_model(x))
    # Scripting left the model as it was: still converted, and ALaST still plans it.
    assert all(type(b) is ViTBlock for b in converted.blocks)
    if converted.cls_token is not None:
        alast = ak.ALaST(converted.train(), token_budget=0.5, train_layers=1, tokens="carry")
        with alast.step():
            converted(x).sum().backward()
        assert alast.history[-1]["keep"][0] < converted.patch_embed.num_patches


def test_scripting_and_tracing_inside_a_step_refuse_naming_restore():
    converted, _ = _pair("vit_tiny_patch16_224")
    alast = ak.ALaST(converted, token_budget=0.5, train_layers=1, tokens="carry")
    with alast.step():
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script: .*plan applied.*ak\.restore\(model\)"):
            _script(converted)
        with pytest.raises(RuntimeError, match=r"torch\.fx symbolic tracing: .*plan applied.*ak\.restore\(model\)"):
            torch.fx.symbolic_trace(converted, concrete_args=CONCRETE)
        converted(_inputs()).sum().backward()  # the step itself goes on
    # Outside the step both work again.
    _script(converted.eval())
    torch.fx.symbolic_trace(converted, concrete_args=CONCRETE)
