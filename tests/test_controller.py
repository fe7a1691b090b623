"""The ALaST controller and its budget policies (docs/alast.md §2) on a tiny timm ViT (4 blocks, 16 patches)."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from alast_kernels import ALaST, ViTBlock, policies, restore


pytestmark = pytest.mark.usefixtures("reference_backend")


L, NP = 4, 16
EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed")


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=L, num_heads=3, num_classes=5,
                             **kwargs)


def batches(count, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(count)]


def train(model, ctrl, opt, data):
    """One ALaST step per batch; returns the plans and the losses."""
    plans, losses = [], []
    for x, y in data:
        with ctrl.step() as plan:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        plans.append(plan)
        losses.append(loss.item())
    return plans, losses


def embedding_parameters(model):
    return [p for name, p in model.named_parameters() if name.split(".")[0] in EMBEDDINGS]


# ------------------------------------------------------------------------------------ policies
@pytest.mark.parametrize("token_budget,min_keep", [(0.6, 0.2), (0.3, 0.1), (0.9, 0.5), (0.25, 0.25)])
def test_water_fill_holds_the_mean_within_bounds(token_budget, min_keep):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        budgets = (torch.rand(12, generator=g, dtype=torch.float64) * 3).tolist()
        r = policies.water_fill(budgets, token_budget, min_keep)
        assert abs(sum(r) / len(r) - token_budget) <= 1e-9
        assert all(min_keep <= v <= 1.0 for v in r)
        # Higher budget, higher (or equal) ratio; unclamped ratios are one scale times the budget.
        order = sorted(range(12), key=lambda i: budgets[i])
        assert all(r[a] <= r[b] + 1e-12 for a, b in zip(order, order[1:]))
        inside = [i for i in range(12) if min_keep + 1e-9 < r[i] < 1 - 1e-9]
        scales = [r[i] / budgets[i] for i in inside]
        assert max(scales, default=0) - min(scales, default=0) <= 1e-9 * max(scales, default=1)


def test_water_fill_clamps():
    # By hand: layer 0 saturates at 1, layer 4 sits at min_keep, the other three share the rest equally.
    r = policies.water_fill([10.0, 1.0, 1.0, 1.0, 0.01], 0.5, 0.2)
    expected = [1.0, 1.3 / 3, 1.3 / 3, 1.3 / 3, 0.2]
    assert all(abs(a - b) <= 1e-9 for a, b in zip(r, expected)), r
    assert policies.water_fill([0.3, 2.0, 1.0], 1.0, 0.2) == [1.0, 1.0, 1.0]
    assert all(abs(v - 0.2) <= 1e-12 for v in policies.water_fill([0.3, 2.0, 1.0], 0.2, 0.2))
    assert all(abs(v - 0.6) <= 1e-12 for v in policies.water_fill([1.0] * 5, 0.6, 0.2))
    # Zero budgets get min_keep; the others share the rest.
    r = policies.water_fill([0.0, 0.0, 1.0, 1.0], 0.6, 0.2)
    assert all(abs(a - b) <= 1e-9 for a, b in zip(r, [0.2, 0.2, 1.0, 1.0])), r


def test_alast_update():
    b, deltas, alpha = [1.0, 0.5, 1.5, 1.0], [0.2, 0.0, 0.6, 0.2], 0.25
    total = sum(deltas)
    expected = [(1 - alpha) * bl + alpha * 4 * dl / total for bl, dl in zip(b, deltas)]
    got = policies.alast_update(b, deltas, alpha)
    assert all(abs(a - e) <= 1e-12 for a, e in zip(got, expected))
    assert abs(sum(got) - 4) <= 1e-12  # budgets that sum to L keep summing to L
    # No block moved the class token: importance is uniform.
    assert policies.alast_update(b, [0.0] * 4, alpha) == [(1 - alpha) * v + alpha for v in b]


def test_paper_update_clips_to_the_authors_range():
    got = policies.paper_update([0.5, 0.9, 0.6, 0.7], [3.0, 2.0, 1.0, 1.0], [1.0, 1.0, 2.0, 1.2], 0.5)
    assert got == [1.0, 1.0, 0.5, pytest.approx(0.6)]


def test_top_layers():
    assert policies.top_layers([0.2, 0.9, 0.5, 0.7], 2) == [False, True, False, True]
    assert policies.top_layers([1.0, 1.0, 1.0, 1.0], 3) == [False, True, True, True]  # ties: deeper wins
    assert policies.top_layers([0.3, 0.1, 0.2], 3) == [True, True, True]


def test_sample_layers_seeded_and_proportional():
    budgets = [0.1, 0.2, 0.3, 0.4]
    draws = [policies.sample_layers(budgets, 2, torch.Generator().manual_seed(9)) for _ in range(2)]
    assert draws[0] == draws[1] and sum(draws[0]) == 2
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = [0] * 4
    for _ in range(n):
        picked = policies.sample_layers(budgets, 1, g)
        assert sum(picked) == 1
        counts[picked.index(True)] += 1
    # One draw: P(l) = b_l / Σb exactly; 4000 draws put each frequency within ~4 standard errors.
    for c, b in zip(counts, budgets):
        assert abs(c / n - b) <= 4 * math.sqrt(b * (1 - b) / n), counts
    # Without replacement, inclusion still grows with the budget; a zero budget is (almost) never drawn.
    g = torch.Generator().manual_seed(1)
    inclusion = [0] * 4
    for _ in range(2000):
        for i, t in enumerate(policies.sample_layers([0.0, 0.2, 0.5, 1.0], 2, g)):
            inclusion[i] += t
    assert inclusion[0] == 0 and inclusion[1] < inclusion[2] < inclusion[3]


# --------------------------------------------------------------------------- policies via controller
def test_alast_policy_through_the_controller():
    model = tiny()
    ctrl = ALaST(model, token_budget=0.5, train_layers=2, alpha=0.3, min_keep=0.2, train_embeddings=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    budgets = [1.0] * L
    plans, _ = train(model, ctrl, opt, batches(4))
    for step, plan in enumerate(plans):
        record = ctrl.history[step]
        assert plan.step == step
        assert all(abs(a - b) <= 1e-12 for a, b in zip(plan.budgets, budgets))
        assert abs(sum(plan.keep_ratios) / L - 0.5) <= 1e-9
        assert all(0.2 <= r <= 1.0 for r in plan.keep_ratios)
        assert record["keep"] == [min(NP, math.ceil(r * NP - 1e-9)) for r in plan.keep_ratios]
        top = sorted(range(L), key=lambda l: (budgets[l], l))[-2:]
        assert plan.train == [l in top for l in range(L)]
        assert plan.grad_input == [any(plan.train[:l]) for l in range(L)]
        deltas = record["delta"]
        assert all(d > 0 for d in deltas)
        budgets = [(1 - 0.3) * b + 0.3 * L * d / sum(deltas) for b, d in zip(budgets, deltas)]
    assert all(abs(a - b) <= 1e-12 for a, b in zip(ctrl.budgets, budgets))
    assert len(set(round(b, 9) for b in budgets)) > 1  # the budgets did adapt
    assert ctrl.step_count == 4 and len(ctrl.history) == 4


def test_paper_policy_through_the_controller():
    """The authors' recurrence from the recorded Δ (tests/test_paper.py re-derives the Δ themselves)."""
    model = tiny()
    ctrl = ALaST(model, policy="paper", alpha=0.02, train_layers=2, seed=3)
    assert ctrl.tokens == "drop" and ctrl.budgets == [0.9] * L
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plans, _ = train(model, ctrl, opt, batches(3, batch=8))
    budgets, previous = [0.9] * L, [0.0] * L
    for step, plan in enumerate(plans):
        assert plan.budgets == pytest.approx(budgets, abs=1e-12)
        keep, expected = NP, []
        for b in budgets:  # block l processes what block l-1 passed on: int(b · (1 + kept))
            expected.append(keep)
            keep = min(keep, int(b * (1 + keep)))
        assert ctrl.history[step]["keep"] == expected
        assert sum(plan.train) == 2
        deltas = ctrl.history[step]["delta"]
        budgets = [min(1.0, max(0.5, b + 0.02 * (d - p))) for b, d, p in zip(budgets, deltas, previous)]
        previous = deltas
    assert step == 2 and ctrl.budgets == pytest.approx(budgets, abs=1e-12)
    assert ctrl.budgets != [0.9] * L  # the first step updated too (Δ_{-1} = 0)


def run_sampled(seed, steps=5, model_seed=0):
    model = tiny(model_seed)
    ctrl = ALaST(model, token_budget=0.6, train_layers=2, sample=True, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plans, _ = train(model, ctrl, opt, batches(steps))
    return plans


def test_seeded_sampling_is_reproducible():
    first, second = run_sampled(11), run_sampled(11)
    assert first == second
    assert all(sum(p.train) == 2 for p in first)
    other = run_sampled(12)
    assert [p.train for p in other] != [p.train for p in first]


@pytest.mark.parametrize("kwargs", [dict(policy="alast", token_budget=0.5, sample=True, alpha=0.4),
                                    dict(policy="alast", flop_budget=0.6, sample=True, tokens="drop"),
                                    dict(policy="paper", alpha=0.05)], ids=["alast", "alast-flops-drop", "paper"])
def test_resume_through_state_dict_makes_the_same_plans(kwargs):
    kwargs = dict(kwargs, train_layers=2, seed=4)
    data = batches(6)

    model = tiny()
    ctrl = ALaST(model, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    uninterrupted, _ = train(model, ctrl, opt, data)

    model = tiny()
    ctrl = ALaST(model, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    first_half, _ = train(model, ctrl, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "alast": ctrl.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    model = tiny(seed=99)  # other weights and another generator state until loaded
    model.load_state_dict(saved["model"])
    ctrl = ALaST(model, **kwargs)
    ctrl.load_state_dict(saved["alast"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    opt.load_state_dict(saved["opt"])
    second_half, _ = train(model, ctrl, opt, data[3:])
    assert first_half + second_half == uninterrupted
    assert len(ctrl.history) == 6


def test_load_state_dict_of_another_policy_raises():
    ctrl = ALaST(tiny(), policy="alast")
    other = ALaST(tiny(), policy="paper", alpha=1e-3).state_dict()
    with pytest.raises(ValueError, match="state"):
        ctrl.load_state_dict(other)


# ---------------------------------------------------------------------------------- freezing
def test_frozen_parameters_get_no_grad_and_do_not_move():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # A first step trains everything, so AdamW holds moments for every parameter ...
    warm = ALaST(model, policy="fixed", keep_ratios=[0.5] * L, train=[True] * L, train_embeddings=True)
    (x, y), = batches(1, seed=4)
    with warm.step():
        F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(p in opt.state for p in model.parameters())
    # ... then blocks 0 and 2 and the embeddings freeze; zero_grad(set_to_none=False) leaves zeros behind,
    # which the step must clear (a zero gradient would still apply AdamW's momentum and weight decay).
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None for p in model.parameters())
    ctrl = ALaST(model, policy="fixed", keep_ratios=[0.5] * L, train=[False, True, False, True],
                 train_embeddings=False)
    frozen = embedding_parameters(model) + list(model.blocks[0].parameters()) + list(model.blocks[2].parameters())
    trained = list(model.blocks[1].parameters()) + list(model.blocks[3].parameters()) + \
        list(model.norm.parameters()) + list(model.head.parameters())
    before = {p: p.detach().clone() for p in model.parameters()}
    (x, y), = batches(1, seed=5)
    with ctrl.step():
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in trained)
    opt.step()
    assert all(torch.equal(p, before[p]) for p in frozen)
    assert all(not torch.equal(p, before[p]) for p in trained)


def _graph_probe(model):
    """Forward hooks recording whether the embeddings' and every block's input/output carry a graph."""
    seen = {}

    def hook(name):
        def record(module, args, out):
            seen[name] = (args[0].grad_fn is not None, out.grad_fn is not None)
        return record
    model.patch_embed.register_forward_hook(hook("patch_embed"))
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(hook(i))
    return seen


def test_blocks_below_the_lowest_trained_one_and_frozen_embeddings_run_without_graph():
    model = tiny()
    ctrl = ALaST(model, policy="fixed", keep_ratios=[0.5] * L, train=[False, False, True, False],
                 train_embeddings=False)
    model.pos_embed.requires_grad_(False)  # the user's own choice, kept
    seen = _graph_probe(model)
    (x, y), = batches(1)
    with ctrl.step():
        F.cross_entropy(model(x), y).backward()
    assert seen["patch_embed"] == (False, False)
    assert seen[0] == (False, False) and seen[1] == (False, False)
    assert seen[2] == (False, True) and seen[3] == (True, True)
    assert all(p.grad is None for p in embedding_parameters(model))
    assert all(p.grad is None for i in (0, 1, 3) for p in model.blocks[i].parameters())
    assert all(p.grad is not None for p in model.blocks[2].parameters())
    # The step leaves the parameters as the user had them.
    assert all(p.requires_grad == (p is not model.pos_embed) for p in model.parameters())


def test_trained_embeddings_keep_the_graph_through_frozen_blocks():
    model = tiny()
    ctrl = ALaST(model, policy="fixed", keep_ratios=[0.5] * L, train=[False, False, True, True],
                 train_embeddings=True)
    seen = _graph_probe(model)
    (x, y), = batches(1)
    with ctrl.step():
        F.cross_entropy(model(x), y).backward()
    assert seen["patch_embed"][1] and seen[0] == (True, True) and seen[1] == (True, True)
    assert all(p.grad is not None for p in embedding_parameters(model))
    assert all(p.grad is None for i in (0, 1) for p in model.blocks[i].parameters())


def test_embeddings_train_by_default_when_they_require_grad():
    # As in full fine-tuning: trainable embeddings get gradients and keep the graph through frozen blocks.
    model = tiny()
    ctrl = ALaST(model, policy="fixed", keep_ratios=[0.5] * L, train=[False, False, True, True])
    assert ctrl.train_embeddings and ctrl.plan().grad_input == [True] * L
    seen = _graph_probe(model)
    (x, y), = batches(1)
    with ctrl.step():
        F.cross_entropy(model(x), y).backward()
    assert seen["patch_embed"][1] and seen[0] == (True, True)
    assert all(p.grad is not None for p in embedding_parameters(model))


def test_embeddings_frozen_before_the_controller_stay_frozen_by_default():
    # peft LoRA leaves the embeddings without requires_grad: no graph below the lowest trained block.
    model = tiny()
    for p in embedding_parameters(model):
        p.requires_grad_(False)
    ctrl = ALaST(model, policy="fixed", keep_ratios=[0.5] * L, train=[False, False, True, True])
    assert not ctrl.train_embeddings and ctrl.plan().grad_input == [False, False, False, True]
    assert ctrl.state_dict()["train_embeddings"] is False


def test_train_embeddings_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="train_embeddings: expected True, False or None, got 1"):
        ALaST(tiny(), train_embeddings=1)
    model = tiny()
    for p in embedding_parameters(model):
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="train_embeddings=True: no embedding parameter requires grad"):
        ALaST(model, train_embeddings=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fixed_full_plan_equals_full_fine_tuning(optimizer):
    def make_opt(model):
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    ref = tiny(qkv_bias=True)
    model = copy.deepcopy(ref)
    ctrl = ALaST(model, policy="fixed", keep_ratios=[1.0] * L, train=[True] * L, train_embeddings=True)
    opt_ref, opt = make_opt(ref), make_opt(model)
    for x, y in batches(3):
        loss_ref = F.cross_entropy(ref(x), y)
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        with ctrl.step():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert abs(loss.item() - loss_ref.item()) <= 1e-5
        for (name, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
            assert (p - p_ref).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("tokens,budget", [("carry", 0.3), ("drop", 0.4)])
def test_eval_uses_every_token_and_layer(tokens, budget):
    model = tiny()
    ctrl = ALaST(model, token_budget=budget, min_keep=0.1, train_layers=1, tokens=tokens)
    train(model, ctrl, torch.optim.SGD(model.parameters(), lr=0.05), batches(2))
    assert all(blk.alast_plan is None for blk in model.blocks)  # plans live inside a step only
    unconverted = restore(copy.deepcopy(model)).eval()
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - unconverted(x)).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="eval"):
        with ctrl.step():
            pass


def test_a_failed_step_changes_no_budget():
    model = tiny()
    ctrl = ALaST(model, token_budget=0.5)
    with pytest.raises(ZeroDivisionError):
        with ctrl.step():
            model(torch.randn(2, 3, 32, 32)).sum().backward()
            raise ZeroDivisionError("the step body fails")
    assert ctrl.budgets == [1.0] * L and ctrl.step_count == 0 and ctrl.history == []
    assert all(blk.alast_plan is None for blk in model.blocks)
    with pytest.raises(RuntimeError, match="forward"):
        with ctrl.step():
            pass  # no forward pass: nothing to update the budgets from


def test_a_step_without_update_applies_the_plan_and_changes_nothing():
    model = tiny()
    ctrl = ALaST(model, token_budget=0.5, train_layers=2, sample=True, seed=3)
    data = batches(2)
    train(model, ctrl, torch.optim.SGD(model.parameters(), lr=0.1), data[:1])
    before = ctrl.state_dict()
    with ctrl.step(update=False) as probe:
        model(data[1][0]).sum().backward()
        assert [blk.alast_plan.train for blk in model.blocks] == probe.train
    assert [blk.alast_keep for blk in model.blocks] == [math.ceil(r * NP) for r in probe.keep_ratios]
    after = ctrl.state_dict()
    assert after["budgets"] == before["budgets"] and after["step"] == before["step"] == 1
    assert len(after["history"]) == 1 and torch.equal(after["generator"], before["generator"])
    with ctrl.step() as real:
        model(data[1][0]).sum().backward()
    assert real == probe  # the counted step makes the plan the probe ran


@pytest.mark.parametrize("kwargs,prefix", [({"reg_tokens": 3}, 4), ({"no_embed_class": True}, 1)])
def test_prefix_tokens_through_the_controller(kwargs, prefix):
    model = tiny(**kwargs)
    ctrl = ALaST(model, token_budget=0.4, min_keep=0.1)
    train(model, ctrl, torch.optim.SGD(model.parameters(), lr=0.05), batches(2))
    assert all(blk.num_prefix_tokens == prefix for blk in model.blocks)
    for record in ctrl.history:
        assert record["keep"] == [min(NP, math.ceil(r * NP - 1e-9)) for r in record["keep_ratio"]]


def test_converts_the_model():
    model = tiny()
    ALaST(model)
    assert all(type(blk) is ViTBlock for blk in model.blocks)


# ---------------------------------------------------------------------------------- bad input
BAD_ARGUMENTS = [
    ({"token_budget": 0}, "token_budget"),
    ({"token_budget": 1.01}, "token_budget"),
    ({"token_budget": -0.5}, "token_budget"),
    ({"token_budget": float("nan")}, "token_budget"),
    ({"token_budget": True}, "token_budget"),
    ({"token_budget": "0.5"}, "token_budget"),
    ({"train_layers": 0}, "train_layers"),
    ({"train_layers": L + 1}, "train_layers"),
    ({"train_layers": 2.0}, "train_layers"),
    ({"train_layers": True}, "train_layers"),
    ({"policy": "random"}, "policy"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": 1.5}, "alpha"),
    ({"min_keep": 0}, "min_keep"),
    ({"min_keep": 0.7, "token_budget": 0.6}, "min_keep"),
    ({"policy": "fixed"}, "keep_ratios"),
    ({"policy": "fixed", "keep_ratios": [1.0] * L}, "train"),
    ({"policy": "fixed", "keep_ratios": [1.0] * (L - 1), "train": [True] * L}, "keep_ratios"),
    ({"policy": "fixed", "keep_ratios": [1.0] * (L + 1), "train": [True] * L}, "keep_ratios"),
    ({"policy": "fixed", "keep_ratios": [1.0] * L, "train": [True] * (L - 1)}, "train"),
    ({"policy": "fixed", "keep_ratios": [0.5, 0.0, 1.0, 1.0], "train": [True] * L}, r"keep_ratios\[1\]"),
    ({"policy": "fixed", "keep_ratios": [0.5, 1.5, 1.0, 1.0], "train": [True] * L}, r"keep_ratios\[1\]"),
    ({"keep_ratios": [1.0] * L, "train": [True] * L}, "keep_ratios"),
    # Options a policy ignores are refused when given, never dropped silently.
    ({"policy": "paper", "alpha": 1e-3, "token_budget": 0.1}, "token_budget.*'paper' policy ignores"),
    ({"policy": "paper", "alpha": 1e-3, "token_budget": 0.6}, "token_budget"),
    ({"policy": "paper", "alpha": 1e-3, "flop_budget": 0.6}, "flop_budget"),
    ({"policy": "paper", "alpha": 1e-3, "min_keep": 0.3}, "min_keep"),
    ({"policy": "fixed", "keep_ratios": [1.0] * L, "train": [True] * L, "token_budget": 0.5}, "token_budget"),
    ({"policy": "fixed", "keep_ratios": [1.0] * L, "train": [True] * L, "alpha": 0.5}, "alpha"),
    # The paper policy's alpha is the optimizer's learning rate: required, finite, positive.
    ({"policy": "paper"}, "alpha.*learning rate"),
    ({"policy": "paper", "alpha": 0}, "alpha"),
    ({"policy": "paper", "alpha": -1e-3}, "alpha"),
    ({"policy": "paper", "alpha": float("inf")}, "alpha"),
    ({"policy": "paper", "alpha": "1e-3"}, "alpha"),
    ({"policy": "paper", "alpha": True}, "alpha"),
    # Token modes.
    ({"tokens": "shrink"}, "tokens"),
    ({"tokens": True}, "tokens"),
    ({"tokens": "drop", "token_budget": 0.3, "min_keep": 0.2}, r"token_budget.*\(1 \+ \(L-1\)"),
    ({"policy": "fixed", "tokens": "drop", "keep_ratios": [0.5] * L, "train": [True] * L}, "keep_ratios.*drop"),
    ({"policy": "fixed", "tokens": "drop", "keep_ratios": [1.0, 0.5, 0.75, 0.5], "train": [True] * L},
     "keep_ratios.*drop"),
    # FLOP budgets.
    ({"flop_budget": 0.6, "token_budget": 0.6}, "token_budget, flop_budget"),
    ({"flop_budget": 0}, "flop_budget"),
    ({"flop_budget": 1.5}, "flop_budget"),
    ({"flop_budget": float("nan")}, "flop_budget"),
    ({"flop_budget": True}, "flop_budget"),
    ({"flop_budget": 0.1}, "flop_budget: expected at least"),
    ({"seed": 1.5}, "seed"),
]


@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    model = tiny()
    with pytest.raises(ValueError, match=name):
        ALaST(model, **kwargs)
    assert all(type(blk) is Block for blk in model.blocks)  # a rejected controller leaves the model alone


def test_numpy_scalars_are_accepted_where_python_numbers_are():
    import numpy as np
    data = batches(3)
    plans = []
    for kwargs in (dict(train_layers=2, token_budget=0.5, alpha=0.3, min_keep=0.25, seed=3, flop_budget=None),
                   dict(train_layers=np.int64(2), token_budget=np.float32(0.5), alpha=np.float64(0.3),
                        min_keep=np.float32(0.25), seed=np.int64(3))):
        model = tiny()
        ctrl = ALaST(model, sample=True, **kwargs)
        plans.append(train(model, ctrl, torch.optim.SGD(model.parameters(), lr=0.05), data)[0])
    assert plans[0] == plans[1]
    model = tiny()
    assert ALaST(model, policy="paper", alpha=np.float32(1e-3), train_layers=np.int32(3)).train_layers == 3


def test_model_without_class_token_raises():
    model = tiny(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        ALaST(model)
    assert all(type(blk) is Block for blk in model.blocks)


# ------------------------------------------------------------------------ gradient accumulation
@pytest.mark.parametrize("tokens,keep_ratios", [("carry", [0.5, 0.75, 1.0, 0.25]), ("drop", [1.0, 0.75, 0.5, 0.25])])
def test_micro_batches_in_one_step_accumulate_gradients_under_one_plan(tokens, keep_ratios):
    model = tiny()
    ref = copy.deepcopy(model)
    kwargs = dict(policy="fixed", keep_ratios=keep_ratios, train=[False, True, True, True], tokens=tokens)
    ctrl, ctrl_ref = ALaST(model, **kwargs), ALaST(ref, **kwargs)
    micro = batches(3, batch=2, seed=7)
    with ctrl.step():
        for x, y in micro:
            F.cross_entropy(model(x), y).backward()
    # The same micro-batches one step each, gradients summed by hand.
    total = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    deltas = []
    for x, y in micro:
        with ctrl_ref.step():
            F.cross_entropy(ref(x), y).backward()
        deltas.append(ctrl_ref.history[-1]["delta"])
        for n, p in ref.named_parameters():
            if p.grad is not None:
                total[n] += p.grad
        ref.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if p.grad is None:
            assert not total[n].any(), n
        else:
            assert (p.grad - total[n]).abs().max().item() <= 1e-5, n
    # The budgets are updated once, from the mean importance of the micro-batches.
    assert len(ctrl.history) == 1
    mean = [sum(d[l] for d in deltas) / 3 for l in range(L)]
    assert ctrl.history[0]["delta"] == pytest.approx(mean, rel=1e-5)


def test_a_step_that_would_drop_accumulated_gradients_raises():
    model = tiny()
    first = ALaST(model, policy="fixed", keep_ratios=[0.5] * L, train=[True, True, True, True])
    second = ALaST(model, policy="fixed", keep_ratios=[0.5] * L, train=[True, False, True, True])
    x, y = batches(1)[0]
    with first.step():
        F.cross_entropy(model(x), y).backward()
    kept = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(RuntimeError, match=r"blocks\.1.*discard"):
        with second.step():
            pass
    # Nothing was dropped, and no plan was left applied.
    assert all(torch.equal(model.get_parameter(n).grad, g) for n, g in kept.items())
    assert all(blk.alast_plan is None for blk in model.blocks)
    model.zero_grad(set_to_none=False)  # zeros hold nothing: the step clears them
    with second.step():
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.blocks[1].parameters())


# --------------------------------------------------------------------- one plan at a time
@pytest.mark.parametrize("inner,match", [("same", "nested step"), ("second", "another controller")])
def test_a_step_inside_a_step_is_refused_and_the_outer_plan_stays_applied(inner, match):
    """A nested step of the same controller, or a step of a second controller on the same blocks, would
    replace the plan the outer step trains under: refused, naming the conflict."""
    model = tiny()
    ctrl = ALaST(model, token_budget=0.5, train_layers=2)
    other = ctrl if inner == "same" else ALaST(model, token_budget=0.9, train_layers=1)
    x, y = batches(1)[0]
    with ctrl.step() as plan:
        with pytest.raises(RuntimeError, match=match):
            with other.step():
                pass
        assert [blk.alast_plan for blk in model.blocks] == list(plan.blocks)
        F.cross_entropy(model(x), y).backward()
    assert len(ctrl.history) == 1 and ctrl.history[0]["step"] == 0
    assert other is ctrl or other.history == []
    for blk, trained in zip(model.blocks, plan.train):  # the outer plan trained what it said
        assert all((p.grad is not None) == trained for p in blk.parameters())
    model.zero_grad(set_to_none=True)
    with other.step():  # usable again once the outer step is over (one after the other is fine)
        F.cross_entropy(model(x), y).backward()
    assert len(other.history) == (2 if other is ctrl else 1)


# ---------------------------------------------------------------------------- saved states
def _trained_state(policy_kwargs):
    model = tiny()
    ctrl = ALaST(model, train_layers=2, **policy_kwargs)
    train(model, ctrl, torch.optim.SGD(model.parameters(), lr=0.05), batches(2))
    return ctrl


@pytest.mark.parametrize("policy_kwargs", [{"token_budget": 0.5}, {"policy": "paper", "alpha": 0.01}],
                         ids=["alast", "paper"])
@pytest.mark.parametrize("change,name", [
    (lambda s: list(s.items()), "state: expected the dict"),
    (lambda s: {**s, "budgets": s["budgets"][:-1]}, "budgets"),
    (lambda s: {**s, "budgets": s["budgets"] + [0.9]}, "budgets"),
    (lambda s: {**s, "budgets": [float("nan")] + s["budgets"][1:]}, "budgets"),
    (lambda s: {**s, "budgets": ["0.9"] + s["budgets"][1:]}, "budgets"),
    (lambda s: {**s, "budgets": 0.9}, "budgets"),
    (lambda s: {**s, "previous_deltas": s["previous_deltas"][:-1]}, "previous_deltas"),
    (lambda s: {**s, "previous_deltas": [float("inf")] + s["previous_deltas"][1:]}, "previous_deltas"),
    (lambda s: {**s, "step": -1}, "step"),
    (lambda s: {**s, "step": 1.5}, "step"),
    (lambda s: {**s, "generator": [0, 1]}, "generator"),
    (lambda s: {**s, "generator": torch.zeros(3, dtype=torch.uint8)}, "generator"),
    (lambda s: {**s, "history": {}}, "history"),
    (lambda s: {k: v for k, v in s.items() if k != "budgets"}, "missing budgets"),
], ids=["list", "short-budgets", "long-budgets", "nan-budget", "str-budget", "scalar-budgets", "short-deltas",
        "inf-delta", "negative-step", "float-step", "list-generator", "bad-generator", "history-dict",
        "no-budgets"])
def test_load_state_dict_validates_everything_before_changing_anything(policy_kwargs, change, name):
    saved = _trained_state(policy_kwargs).state_dict()
    ctrl = _trained_state(policy_kwargs)
    train(ctrl.model, ctrl, torch.optim.SGD(ctrl.model.parameters(), lr=0.05), batches(1, seed=5))
    before = ctrl.state_dict()
    with pytest.raises(ValueError, match=name):
        ctrl.load_state_dict(change(copy.deepcopy(saved)))
    after = ctrl.state_dict()
    assert after["budgets"] == before["budgets"] and after["previous_deltas"] == before["previous_deltas"]
    assert after["step"] == before["step"] == 3 and len(after["history"]) == 3
    assert torch.equal(after["generator"], before["generator"])
    ctrl.load_state_dict(saved)  # the unchanged state loads
    assert ctrl.state_dict()["step"] == 2


def test_paper_budgets_outside_the_authors_range_are_refused():
    ctrl = _trained_state({"policy": "paper", "alpha": 0.01})
    state = ctrl.state_dict()
    with pytest.raises(ValueError, match=r"budgets.*\[0\.5, 1\.0\]"):
        ctrl.load_state_dict({**state, "budgets": [0.4] + state["budgets"][1:]})


def test_a_refused_method_leaves_the_model_as_it_was():
    import alast_kernels as ak
    model = tiny()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head"))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for bad in (dict(token_budget=2), dict(policy="paper"), dict(flop_budget=0.01)):
        with pytest.raises(ValueError):
            ak.methods.create("alast", model, **bad)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(type(blk) is Block for blk in model.blocks)


# ---------------------------------------------------------------------------- errors, wrappers
@pytest.mark.parametrize("field,kwargs", [("token_budget", {"token_budget": 0.5}),
                                          ("policy", {"policy": "paper", "alpha": 1e-3}),
                                          ("train_layers", {"train_layers": 2}),
                                          ("min_keep", {"min_keep": 0.1}),
                                          ("tokens", {"tokens": "carry"}),
                                          ("flop_budget", {"flop_budget": 0.7})])
def test_loading_a_state_of_another_configuration_names_the_mismatch(field, kwargs):
    saved = ALaST(tiny(), **kwargs).state_dict()
    ctrl = ALaST(tiny(), token_budget=0.6, policy="alast", train_layers=3, min_keep=0.2)
    with pytest.raises(ValueError, match=field):
        ctrl.load_state_dict(saved)


def test_loading_a_state_of_another_depth_names_it():
    deeper = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=L + 2, num_heads=3, num_classes=5)
    saved = ALaST(deeper, train_layers=3).state_dict()
    with pytest.raises(ValueError, match="num_layers"):
        ALaST(tiny(), train_layers=3).load_state_dict(saved)


def test_another_timm_block_class_is_named_as_unsupported():
    import timm
    sam = timm.create_model("samvit_base_patch16", img_size=64, pretrained=False)
    with pytest.raises(TypeError, match="VisionTransformerSAM.*vision_transformer_sam.Block"):
        ALaST(sam)


def test_ddp_without_find_unused_parameters_is_refused_with_what_to_pass(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="find_unused_parameters=True"):
            ALaST(DDP(tiny()))
        model = tiny()
        ddp = DDP(model, find_unused_parameters=True)
        ctrl = ALaST(ddp, token_budget=0.5)  # finds the ViT inside
        assert ctrl.model is model
        plans, _ = train(ddp, ctrl, torch.optim.SGD(ddp.parameters(), lr=0.05), batches(2))
        assert len(ctrl.history) == 2
    finally:
        dist.destroy_process_group()


def test_blocks_sharded_before_convert_are_refused_with_the_order_to_use(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        model = tiny()
        mesh = init_device_mesh("cpu", (1,))
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)
        with pytest.raises(NotImplementedError, match="before convert"):
            ALaST(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kwargs", [dict(token_budget=0.5), dict(token_budget=0.5, tokens="drop"),
                                    dict(policy="paper", alpha=0.5)], ids=["carry", "drop", "paper"])
def test_activation_checkpointing_gives_the_same_step(kwargs):
    """timm's grad checkpointing recomputes each planned block in backward under the same plan."""
    model = tiny(qkv_bias=True)
    ref = copy.deepcopy(model)
    ctrl, ctrl_ref = ALaST(model, train_layers=2, **kwargs), ALaST(ref, train_layers=2, **kwargs)
    model.set_grad_checkpointing(True)
    for x, y in batches(3):
        for m, c in ((model, ctrl), (ref, ctrl_ref)):
            with c.step():
                F.cross_entropy(m(x), y).backward()
        assert ctrl.history[-1]["keep"] == ctrl_ref.history[-1]["keep"]
        assert ctrl.history[-1]["delta"] == pytest.approx(ctrl_ref.history[-1]["delta"], rel=1e-5)
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert (p.grad - q.grad).abs().max().item() <= 1e-5, n
        model.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)


def test_token_mode_defaults():
    """docs/alast.md, "Measured: the three variants at the same training FLOPs": dropping tokens through
    depth measured closest to full fine-tuning, so it is the default of "alast" and "paper"; "fixed" keeps its
    given per-block ratios carried."""
    assert ALaST(tiny()).tokens == "drop"
    assert ALaST(tiny(), policy="paper", alpha=1e-3).tokens == "drop"
    assert ALaST(tiny(), policy="fixed", keep_ratios=[0.5] * L, train=[True] * L).tokens == "carry"
    assert ALaST(tiny(), tokens="carry").tokens == "carry"
