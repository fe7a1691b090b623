"""``policy="paper"`` against an independent float64 re-derivation of the authors' ALaST (docs/alast.md, "The
authors' algorithm"): the tokens each block passes on, Δ, the budget recurrence and the K blocks trained."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import _naive
from alast_kernels import ALaST, policies

pytestmark = pytest.mark.usefixtures("reference_backend")

L, K, NP = 4, 2, 16


def tiny():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=L, num_heads=2, num_classes=3,
                             qkv_bias=True).double()


def batches(count, batch=3):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(batch, 3, 16, 16, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (batch,), generator=g))
            for _ in range(count)]


def test_training_steps_follow_the_authors_forward_and_update():
    model = tiny()
    alpha = 20.0  # large enough for the budgets to reach the clip bounds within a few steps
    ctrl = ALaST(model, policy="paper", alpha=alpha, train_layers=K, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outputs = []
    hooks = [blk.register_forward_hook(lambda m, args, out: outputs.append(out.detach())) for blk in model.blocks]
    budgets, previous = [0.9] * L, [0.0] * L
    clipped = set()
    for step, (x, y) in enumerate(batches(6)):
        want_logits, want_out, origins, want_delta = _naive.paper_vit(model, x, budgets)
        before = [[p.detach().clone() for p in blk.parameters()] for blk in model.blocks]
        outputs.clear()
        with ctrl.step() as plan:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = ctrl.history[step]
        assert record["budget"] == pytest.approx(budgets, abs=1e-6)  # Δ is recorded in float32
        # The tokens after each block: the same values (so the same tokens), in ascending original order.
        for l, (got, want, origin) in enumerate(zip(outputs, want_out, origins)):
            assert got.shape == want.shape, (step, l)
            assert (got - want).abs().max().item() <= 1e-10, (step, l)
            assert all(origin[b].tolist() == sorted(origin[b].tolist()) and origin[b, 0] == 0
                       for b in range(x.shape[0]))
        assert loss.item() == pytest.approx(F.cross_entropy(want_logits, y).item(), abs=1e-10)
        # Each block processed what the block before it passed on, the class token not counted.
        assert record["keep"] == [NP] + [o.shape[1] - 1 for o in want_out[:-1]]
        # Δ summed over the batch and the width (recorded in float32).
        assert record["delta"] == pytest.approx([d.item() for d in want_delta], rel=1e-6)
        # K blocks trained; the others took no gradient and did not move.
        assert sum(plan.train) == K
        for blk, trained, old in zip(model.blocks, plan.train, before):
            moved = [not torch.equal(p, q) for p, q in zip(blk.parameters(), old)]
            assert any(moved) if trained else not any(moved)
        # The recurrence, from the re-derived Δ: b ← clip(b + α(Δ_t − Δ_{t−1}), 0.5, 1), Δ_{-1} = 0.
        deltas = [d.item() for d in want_delta]
        raw = [b + alpha * (d - p) for b, d, p in zip(budgets, deltas, previous)]
        clipped |= {("low" if r < 0.5 else "high") for r in raw if not 0.5 <= r <= 1}
        budgets, previous = [min(1.0, max(0.5, r)) for r in raw], deltas
        assert ctrl.budgets == pytest.approx(budgets, abs=1e-6)
    for h in hooks:
        h.remove()
    assert clipped  # the clip was exercised
    assert len({tuple(r["keep"]) for r in ctrl.history}) > 1  # the token counts moved with the budgets
    # Evaluation runs the plain model: every token, every block.
    model.eval()
    with torch.no_grad():
        full = _naive.vit_head(model, _naive.block_outputs(model, batches(1)[0][0])[-1])
        assert (model(batches(1)[0][0]) - full).abs().max().item() <= 1e-10


def _inclusion(probabilities, count):
    """P(layer in the draw) for ``count`` successive draws without replacement, by enumerating the orders."""
    inclusion = [0.0] * len(probabilities)
    for order in itertools.permutations(range(len(probabilities)), count):
        p, left = 1.0, 1.0
        for i in order:
            p *= probabilities[i] / left
            left -= probabilities[i]
        for i in order:
            inclusion[i] += p
    return inclusion


def test_trained_blocks_are_drawn_with_softmax_probabilities():
    budgets = [0.5, 0.6, 0.8, 1.0]
    e = [math.exp(b) for b in budgets]
    want = _inclusion([v / sum(e) for v in e], 2)
    g = torch.Generator().manual_seed(0)
    n = 6000
    counts = [0] * 4
    for _ in range(n):
        draw = policies.softmax_layers(budgets, 2, g)
        assert sum(draw) == 2
        counts = [c + t for c, t in zip(counts, draw)]
    for c, p in zip(counts, want):
        assert abs(c / n - p) <= 4 * math.sqrt(p * (1 - p) / n), (counts, want)
    # Not proportional to the budgets: the draw the library's own policy makes would differ.
    assert abs(want[0] - _inclusion([b / sum(budgets) for b in budgets], 2)[0]) > 0.02


def test_the_first_step_updates_and_eval_forwards_do_not():
    model = tiny()
    ctrl = ALaST(model, policy="paper", alpha=0.5, train_layers=K)
    x, y = batches(1)[0]
    model.eval()
    with torch.no_grad():
        model(x)  # the authors' code would update its budgets here; the library does not
    assert ctrl.budgets == [0.9] * L
    model.train()
    with ctrl.step():
        F.cross_entropy(model(x), y).backward()
    assert ctrl.budgets != [0.9] * L
    deltas = ctrl.history[0]["delta"]
    assert ctrl.budgets == pytest.approx([min(1.0, max(0.5, 0.9 + 0.5 * d)) for d in deltas], abs=1e-12)


def test_carry_mode_keeps_the_authors_counts_and_scores_each_block_input():
    model = tiny()
    ctrl = ALaST(model, policy="paper", alpha=0.5, train_layers=K, tokens="carry")
    x, y = batches(1)[0]
    with ctrl.step() as plan:
        out = model(x)
        assert out.shape == (3, 3)
        F.cross_entropy(out, y).backward()
    # int(0.9 · 17) = 15 of the 16 patch tokens in every block; the sequence keeps its length.
    assert ctrl.history[0]["keep"] == [15] * L
    assert plan.keep_ratios == [15 / NP] * L
