"""``ViTBlock`` against timm's ``Block`` with the same weights: without a plan, with a full plan, and with
token selection (timm's Block on the gathered tokens, scattered back); frozen and no-graph plans;
constructor keywords; ``state_dict`` keys.

Float32, max abs diff <= 1e-5 (relative above magnitude 1) for the output and every gradient.
``N = 1 + 13`` tokens, ``D = 36``.
"""
import functools

import pytest
import torch
import torch.nn as nn
from timm.layers import Attention, RmsNorm
from timm.models.vision_transformer import Block

import _naive as naive
from alast_kernels import BlockPlan, ViTBlock, ops
from alast_kernels.measure import saved_activation_bytes


B, N, D, H = 2, 14, 36, 3
ATOL = 1e-5

CONFIGS = {
    "default": {},
    "qkv_bias": {"qkv_bias": True},
    "qk_norm": {"qkv_bias": True, "qk_norm": True},
    "layer_scale": {"init_values": 0.3},
    "no_proj_bias": {"proj_bias": False},
    "mlp_ratio": {"mlp_ratio": 2.5},
    "scale_norms": {"scale_attn_norm": True, "scale_mlp_norm": True},
    "gelu_tanh": {"act_layer": functools.partial(nn.GELU, approximate="tanh")},
    "relu": {"act_layer": nn.ReLU},
    "no_affine_norm": {"norm_layer": functools.partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6)},
    "rms_norm": {"norm_layer": RmsNorm},  # not a LayerNorm: gathered, then called as a module
}
DROPOUT_CONFIGS = {
    "proj_drop": {"proj_drop": 0.3},
    "attn_drop": {"attn_drop": 0.3, "qkv_bias": True},
    "drop_path": {"drop_path": 0.3, "init_values": 0.3},
    "all_dropout": {"proj_drop": 0.2, "attn_drop": 0.2, "drop_path": 0.2},
}
ALL_CONFIGS = {**CONFIGS, **DROPOUT_CONFIGS}


pytestmark = pytest.mark.usefixtures("reference_backend")


def make_pair(config, dtype=torch.float32, seed=0):
    """A timm Block with randomised weights (norms and LayerScale too) and a ViTBlock holding a copy."""
    torch.manual_seed(seed)
    ref = Block(D, H, **ALL_CONFIGS[config]).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    blk = ViTBlock(D, H, **ALL_CONFIGS[config]).to(dtype)
    blk.load_state_dict(ref.state_dict())
    return ref, blk


def inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, N, D, generator=g, dtype=torch.float64).to(dtype)
    return x, grad


def run(fn, module, x, grad, rng_seed=None):
    """Output, input gradient and parameter gradients of ``fn(x)`` under ``grad``."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    out = fn(x)
    out.backward(grad)
    return out.detach(), x.grad, {name: p.grad for name, p in module.named_parameters()}


def assert_same(got, want, atol=ATOL):
    """Output and every gradient within ``atol``, relative to the reference's magnitude above 1 (float32
    rounding grows with the values: a gradient of size 10 carries ten times the rounding of one of size 1)."""
    def close(a, b):
        return (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item())

    out, gx, gp = got
    out_ref, gx_ref, gp_ref = want
    assert close(out, out_ref)
    if gx_ref is None:
        assert gx is None
    else:
        assert close(gx, gx_ref)
    assert gp.keys() == gp_ref.keys()
    for name in gp_ref:
        if gp_ref[name] is None:
            assert gp[name] is None, name
        else:
            assert gp[name] is not None, name
            assert close(gp[name], gp_ref[name]), name


def timm_scores(ref, x):
    """Step 1 of docs/alast.md §1 computed through timm's own modules, projecting every key."""
    with torch.no_grad():
        attn = ref.attn
        qkv = attn.qkv(ref.norm1(x)).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, attn.head_dim)
        q, k = attn.q_norm(qkv[:, :, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        logits = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2).double() * attn.scale
        return naive.softmax(logits).mean(dim=1)


def gathered_then_scattered(ref, idx):
    """timm's Block applied to the tokens ``idx`` of each row, written back into the input."""
    rows = torch.arange(idx.shape[0]).unsqueeze(1)

    def fn(x):
        return x.index_put((rows, idx), ref(x[rows, idx]))
    return fn


# -------------------------------------------------------------------------------------- no plan
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_plan_matches_timm(config, mode):
    ref, blk = make_pair(config)
    ref.train(mode == "train")
    blk.train(mode == "train")
    x, g = inputs()
    assert_same(run(blk, blk, x, g), run(ref, ref, x, g))


@pytest.mark.parametrize("config", sorted(DROPOUT_CONFIGS))
def test_dropout_matches_timm_under_the_same_random_state(config):
    """In training mode both draw the same masks from the same seed: same output and gradients."""
    ref, blk = make_pair(config)
    x, g = inputs()
    got = run(blk, blk, x, g, rng_seed=7)
    assert_same(got, run(ref, ref, x, g, rng_seed=7))
    # The comparison means something: dropout is active (another seed, or eval mode, differs) ...
    other = run(blk, blk, x, g, rng_seed=8)
    assert (other[0] - got[0]).abs().max().item() > 1e-3
    ref.eval()
    blk.eval()
    evaluated = run(blk, blk, x, g)
    assert (evaluated[0] - got[0]).abs().max().item() > 1e-3
    # ... and in eval mode there is none, on either side.
    assert_same(evaluated, run(ref, ref, x, g))


def test_float64_no_plan_matches_timm_tightly():
    ref, blk = make_pair("qk_norm", dtype=torch.float64)
    x, g = inputs(torch.float64)
    assert_same(run(blk, blk, x, g), run(ref, ref, x, g), atol=1e-10)


def test_attn_mask_runs_timm_forward():
    ref, blk = make_pair("qkv_bias")
    x, g = inputs()
    mask = torch.zeros(N, N, dtype=torch.bool).fill_diagonal_(True) | (torch.rand(N, N) > 0.3)
    assert_same(run(lambda t: blk(t, attn_mask=mask), blk, x, g), run(lambda t: ref(t, attn_mask=mask), ref, x, g))
    blk.alast_plan = BlockPlan(0.5)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        blk(x, attn_mask=mask)


# -------------------------------------------------------------------------------------- full plan
@pytest.mark.parametrize("config", sorted(ALL_CONFIGS))
def test_full_plan_matches_timm(config):
    ref, blk = make_pair(config)
    blk.alast_plan = BlockPlan(keep_ratio=1.0, train=True, grad_input=True)
    x, g = inputs()
    got = run(blk, blk, x, g, rng_seed=3)
    want = run(ref, ref, x, g, rng_seed=3)
    assert_same(got, want)
    assert blk.alast_keep == N - 1
    if config not in DROPOUT_CONFIGS:  # Δ: how much the block moved the class token
        delta = ((want[0][:, 0] - x[:, 0]).double() ** 2).sum(-1).mean()
        assert abs(blk.alast_importance.item() - delta.item()) <= 1e-4 * max(1.0, delta.item())


# ------------------------------------------------------------------------------- token selection
SELECT_CONFIGS = ["default", "qk_norm", "layer_scale", "no_proj_bias", "mlp_ratio", "gelu_tanh", "relu",
                  "scale_norms", "no_affine_norm", "rms_norm"]


@pytest.mark.parametrize("config", SELECT_CONFIGS)
@pytest.mark.parametrize("keep_ratio,num_prefix", [(0.5, 1), (0.2, 1), (0.4, 3)])
def test_selection_equals_timm_on_gathered_tokens(config, keep_ratio, num_prefix):
    ref, blk = make_pair(config)
    blk.init_alast(num_prefix_tokens=num_prefix)
    blk.alast_plan = BlockPlan(keep_ratio=keep_ratio, train=True)
    x, g = inputs()
    num_patches = N - num_prefix
    keep = -(-int(round(keep_ratio * 100)) * num_patches // 100)  # ceil(keep_ratio · Np), exact
    idx = naive.select_tokens(timm_scores(ref, x), keep, num_prefix)
    # The block's own scores select the same tokens.
    assert torch.equal(ops.select_tokens(blk.token_scores(x), keep, num_prefix), idx)

    got = run(blk, blk, x, g)
    want = run(gathered_then_scattered(ref, idx), ref, x, g)
    assert_same(got, want)
    assert blk.alast_keep == keep

    dropped = torch.ones(B, N, dtype=torch.bool)
    dropped[torch.arange(B).unsqueeze(1), idx] = False
    assert int(dropped.sum()) == B * (num_patches - keep)
    assert torch.equal(got[0][dropped], x[dropped])  # dropped tokens pass through unchanged ...
    assert torch.equal(got[1][dropped], g[dropped])  # ... and so does their gradient
    assert not torch.equal(got[0][~dropped], x[~dropped])

    y_cls = want[0][:, 0].double()
    delta = ((y_cls - x[:, 0].double()) ** 2).sum(-1).mean()
    assert abs(blk.alast_importance.item() - delta.item()) <= 1e-4 * max(1.0, delta.item())


def timm_then_dropped(ref, num_prefix, keep):
    """timm's Block on every token, then the prefix and the ``keep`` others that the block's own class-token
    attention (scored on its input, as the block computes it) ranks highest, in index order."""
    def fn(x):
        idx = naive.select_tokens(timm_scores(ref, x), keep, num_prefix)
        y = ref(x)
        return y[torch.arange(x.shape[0]).unsqueeze(1), idx]
    return fn


@pytest.mark.parametrize("config", ["default", "qk_norm", "layer_scale", "rms_norm", "relu"])
@pytest.mark.parametrize("keep_ratio,num_prefix", [(0.5, 1), (0.2, 1), (0.4, 3), (1.0, 1)])
@pytest.mark.parametrize("train", [True, False])
def test_drop_mode_is_timm_then_the_top_tokens_by_its_own_attention(config, keep_ratio, num_prefix, train):
    ref, blk = make_pair(config)
    blk.init_alast(num_prefix_tokens=num_prefix)
    num_patches = N - num_prefix
    blk.alast_plan = BlockPlan(keep_ratio, train=train, num_patches=num_patches, tokens="drop")
    x, _ = inputs()
    keep = -(-int(round(keep_ratio * 100)) * num_patches // 100)
    g = torch.randn(B, num_prefix + keep, D, generator=torch.Generator().manual_seed(3))
    got = run(blk, blk, x, g)
    want = run(timm_then_dropped(ref, num_prefix, keep), ref, x, g)
    assert got[0].shape == (B, num_prefix + keep, D)
    if train:
        assert_same(got, want)
    else:
        assert all(grad is None for grad in got[2].values())
        assert_same((got[0], got[1], {}), (want[0], want[1], {}))
    assert blk.alast_keep == num_patches  # it processed its whole input
    delta = ((want[0][:, 0].double() - x[:, 0].double()) ** 2).sum(-1)
    assert abs(blk.alast_importance.item() - delta.mean().item()) <= 1e-4 * max(1.0, delta.mean().item())
    assert abs(blk.alast_stats[3].item() - delta.sum().item()) <= 1e-4 * max(1.0, delta.sum().item())


def test_drop_mode_without_graph_and_the_authors_keep_rule():
    ref, blk = make_pair("qkv_bias")
    # int(0.75 · (1 + 13)) = 10 of the 13 patch tokens go on.
    blk.alast_plan = BlockPlan(0.75, train=False, grad_input=False, num_patches=13, tokens="drop", keep_rule="paper")
    assert blk.alast_plan.keep == 10
    x, _ = inputs()
    out = blk(x.requires_grad_(True))
    assert out.grad_fn is None and out.shape == (B, 11, D)
    with torch.no_grad():
        assert (out - timm_then_dropped(ref, 1, 10)(x)).abs().max().item() <= ATOL
    # An input of another length (dynamic image size) counts at forward time by the same rule.
    blk.alast_plan = BlockPlan(0.75, tokens="drop", keep_rule="paper")
    assert blk(torch.randn(B, 9, D)).shape == (B, 1 + 6, D)  # int(0.75 · 9) = 6


@pytest.mark.parametrize("kwargs,name", [({"tokens": "shrink"}, "tokens"), ({"keep_rule": "floor"}, "keep_rule"),
                                         ({"num_prefix": 0}, "num_prefix"), ({"num_prefix": True}, "num_prefix")])
def test_block_plan_rejects_bad_modes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockPlan(0.5, **kwargs)


@pytest.mark.parametrize("config", ["proj_drop", "all_dropout"])
def test_selection_with_dropout_matches_timm_under_the_same_random_state(config):
    ref, blk = make_pair(config)
    blk.alast_plan = BlockPlan(keep_ratio=0.5)
    x, g = inputs()
    idx = naive.select_tokens(timm_scores(ref, x), 7, 1)
    assert_same(run(blk, blk, x, g, rng_seed=5), run(gathered_then_scattered(ref, idx), ref, x, g, rng_seed=5))


@pytest.mark.parametrize("config", ["default", "qk_norm", "layer_scale"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_autocast_bfloat16_matches_timm(config, keep_ratio):
    """Under CPU autocast the residual stream stays float32 and every op runs as in timm's Block."""
    ref, blk = make_pair(config)
    blk.alast_plan = BlockPlan(keep_ratio)
    x, g = inputs()
    keep = 13 if keep_ratio == 1.0 else 7
    idx = naive.select_tokens(timm_scores(ref, x), keep, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(blk, blk, x, g)
        want = run(gathered_then_scattered(ref, idx), ref, x, g)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_same(got, want)


def test_plan_is_ignored_in_eval_mode():
    ref, blk = make_pair("qkv_bias")
    ref.eval()
    blk.eval()
    blk.alast_plan = BlockPlan(keep_ratio=0.3, train=False, grad_input=False)
    x, g = inputs()
    assert_same(run(blk, blk, x, g), run(ref, ref, x, g))
    assert blk.alast_importance is None and blk.alast_keep is None


# --------------------------------------------------------------------------- frozen / no graph
@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
@pytest.mark.parametrize("config", ["qk_norm", "layer_scale", "scale_norms", "relu"])
def test_frozen_plan_gives_no_parameter_grads_and_the_right_input_grad(config, keep_ratio):
    ref, blk = make_pair(config)
    blk.alast_plan = BlockPlan(keep_ratio=keep_ratio, train=False, grad_input=True)
    x, g = inputs()
    keep = 13 if keep_ratio == 1.0 else 7
    idx = naive.select_tokens(timm_scores(ref, x), keep, 1)
    out, gx, gp = run(blk, blk, x, g)
    out_ref, gx_ref, _ = run(gathered_then_scattered(ref, idx), ref, x, g)
    assert all(grad is None for grad in gp.values())
    assert all(p.grad is None for p in blk.parameters())
    assert (out - out_ref).abs().max().item() <= ATOL
    assert (gx - gx_ref).abs().max().item() <= ATOL


def test_trained_plan_without_input_grad():
    ref, blk = make_pair("qkv_bias")
    blk.alast_plan = BlockPlan(keep_ratio=0.5, train=True, grad_input=False)
    x, g = inputs()
    idx = naive.select_tokens(timm_scores(ref, x), 7, 1)
    got = run(blk, blk, x, g)
    out_ref, _, gp_ref = run(gathered_then_scattered(ref, idx), ref, x, g)
    assert_same(got, (out_ref, None, gp_ref))


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_no_graph_plan(keep_ratio):
    ref, blk = make_pair("layer_scale")
    blk.alast_plan = BlockPlan(keep_ratio=keep_ratio, train=False, grad_input=False)
    x, _ = inputs()
    x = x.requires_grad_(True)
    out = blk(x)
    assert out.grad_fn is None and not out.requires_grad
    keep = 13 if keep_ratio == 1.0 else 7
    idx = naive.select_tokens(timm_scores(ref, x), keep, 1)
    with torch.no_grad():
        want = gathered_then_scattered(ref, idx)(x)
    assert (out - want).abs().max().item() <= ATOL
    assert blk.alast_importance is not None and blk.alast_keep == keep


def _saved_bytes(module, x, plan=None):
    if isinstance(module, ViTBlock):
        module.alast_plan = plan
    x = x.clone().requires_grad_(True)
    return saved_activation_bytes(lambda: module(x * 1), list(module.parameters()))


@pytest.mark.parametrize("keep_ratio,keep", [(1.0, 13), (0.5, 7)])
def test_frozen_plan_saves_less_for_backward(keep_ratio, keep):
    """A frozen block drops the norm outputs that only qkv's and fc1's weight gradients need."""
    ref, blk = make_pair("default")
    x, _ = inputs()
    trained = _saved_bytes(blk, x, BlockPlan(keep_ratio, train=True))
    frozen = _saved_bytes(blk, x, BlockPlan(keep_ratio, train=False))
    token_bytes = B * (keep + 1) * D * 4
    assert frozen <= trained - 2 * token_bytes
    assert _saved_bytes(blk, x, BlockPlan(keep_ratio, train=False, grad_input=False)) == 0
    # Without a plan, a ViTBlock saves less than timm's Block: the GELU output is recomputed in backward.
    assert _saved_bytes(blk, x) <= _saved_bytes(ref, x) - B * N * 4 * D * 4


def test_keep_count_rounding():
    assert BlockPlan(0.5, keep_rule="paper").keep_count(196) == 98  # int(0.5 · 197)
    assert BlockPlan(0.9, keep_rule="paper").keep_count(196) == 177  # int(177.3)
    assert BlockPlan(1.0, keep_rule="paper").keep_count(196) == 196  # at most every patch token
    assert BlockPlan(0.5).keep_count(196) == 98
    assert BlockPlan(0.6).keep_count(196) == 118  # ceil(117.6)
    assert BlockPlan(0.01).keep_count(13) == 1
    assert BlockPlan(1.0).keep_count(13) == 13


def test_block_plan_takes_numpy_scalars():
    import numpy as np
    plan = BlockPlan(np.float32(0.5), num_patches=np.int64(13))
    assert plan.keep == 7 and type(plan.keep_ratio) is float and type(plan.num_patches) is int


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_block_plan_rejects_bad_keep_ratio(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        BlockPlan(keep_ratio=bad)


def test_other_norm_layer_frozen_plan():
    ref, blk = make_pair("rms_norm")
    x, g = inputs()
    blk.alast_plan = BlockPlan(1.0, train=False)
    out, gx, gp = run(blk, blk, x, g)
    assert all(v is None for v in gp.values())
    assert (out - ref(x)).abs().max().item() <= ATOL


def test_bad_inputs():
    _, blk = make_pair("default")
    with pytest.raises(ValueError, match="x"):
        blk(torch.randn(N, D))
    blk.init_alast(num_prefix_tokens=N)
    with pytest.raises(ValueError, match="x"):
        blk(torch.randn(B, N, D))


# ------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("config", ["default", "qk_norm", "layer_scale", "no_proj_bias", "scale_norms"])
def test_state_dict_keys_equal_timm(config):
    ref, blk = make_pair(config)
    want, got = ref.state_dict(), blk.state_dict()
    assert list(got) == list(want)
    assert all(got[k].shape == want[k].shape for k in want)
    # ... and a timm Block loads a ViTBlock's state_dict strictly, and back.
    fresh = Block(D, H, **ALL_CONFIGS[config])
    fresh.load_state_dict(got)
    ViTBlock(D, H, **ALL_CONFIGS[config]).load_state_dict(fresh.state_dict())


def test_positional_arguments_like_timm():
    blk = ViTBlock(D, H, 2.0, True)  # mlp_ratio, qkv_bias
    ref = Block(D, H, 2.0, True)
    assert list(blk.state_dict()) == list(ref.state_dict())
    assert blk.mlp.fc1.out_features == 72 and blk.attn.qkv.bias is not None


@pytest.mark.parametrize("value", [None, False, 0, 0.0])
def test_unknown_keyword_off_is_accepted(value):
    blk = ViTBlock(D, H, some_future_option=value)
    assert isinstance(blk, Block)


@pytest.mark.parametrize("value", [True, 1, 0.5, "on"])
def test_unknown_keyword_on_raises_naming_it(value):
    with pytest.raises(NotImplementedError, match="some_future_option"):
        ViTBlock(D, H, some_future_option=value)


class _OtherAttention(Attention):
    """Any attention that is not timm's Attention itself: ViTBlock cannot know what it computes."""


def test_unsupported_attn_layer_raises_naming_it():
    with pytest.raises(NotImplementedError, match="attn_layer"):
        ViTBlock(D, H, attn_layer=_OtherAttention)


_HOOKS = {
    "forward": lambda m: m.register_forward_hook(lambda *a: None),
    "forward_pre": lambda m: m.register_forward_pre_hook(lambda *a: None),
    "backward": lambda m: m.register_full_backward_hook(lambda *a: None),
    "backward_pre": lambda m: m.register_full_backward_pre_hook(lambda *a: None),
    "global_forward": lambda m: nn.modules.module.register_module_forward_hook(lambda *a: None),
    "global_forward_pre": lambda m: nn.modules.module.register_module_forward_pre_hook(lambda *a: None),
    "global_backward": lambda m: nn.modules.module.register_module_full_backward_hook(lambda *a: None),
    "global_backward_pre": lambda m: nn.modules.module.register_module_full_backward_pre_hook(lambda *a: None),
}


@pytest.mark.parametrize("hook", _HOOKS)
def test_no_fused_op_stands_in_for_a_module_any_hook_observes(hook):
    """alast_kernels.fusion.may_fuse, the rule the blocks and the methods share: exact types only, and no
    hook of any kind, the module's own or global."""
    from alast_kernels.fusion import may_fuse

    class MyLinear(nn.Linear):
        pass

    linear = nn.Linear(4, 4)
    assert may_fuse(linear, nn.Linear) and not may_fuse(MyLinear(4, 4), nn.Linear)
    handle = _HOOKS[hook](linear)
    try:
        assert not may_fuse(linear, nn.Linear)
    finally:
        handle.remove()
    assert may_fuse(linear, nn.Linear)
