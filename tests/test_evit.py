"""``evit``: the forward against an independent derivation (tests/_naive.py) at scheduled keep rates, the
cosine schedule and its state, every parameter training, tokens per block, and the options."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import _naive as naive
import alast_kernels as ak
from token_fuse_testing import images, snapshot, tiny_vit, token_counts, train

pytestmark = pytest.mark.usefixtures("reference_backend")


def _cosine(step, rho, schedule, warmup):
    """The schedule from its definition: 1 during warm-up, then a half cosine from 1 down to ρ, then ρ."""
    if step < warmup:
        return 1.0
    if step >= warmup + schedule:
        return rho
    return rho + (1 - rho) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / schedule))


def _advance(method, steps):
    method.model.train()
    for _ in range(steps):
        with method.step():
            pass


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_forward_matches_derivation_at_the_scheduled_rate(reg_tokens):
    vit = tiny_vit(reg_tokens, dtype=torch.float64)
    method = ak.methods.create("evit", vit, schedule_steps=4)
    _advance(method, 2)  # halfway down: keep rate 0.85
    rate = _cosine(2, 0.7, 4, 0)
    assert method.model.training_keep_rate == pytest.approx(rate)
    x = images(dtype=torch.float64)
    method.model.train()
    torch.testing.assert_close(method.model(x), naive.token_fuse_vit(vit, x, (1, 2, 3), rate), rtol=1e-9,
                               atol=1e-10)
    method.model.eval()  # inference uses the final rate ρ
    torch.testing.assert_close(method.model(x), naive.token_fuse_vit(vit, x, (1, 2, 3), 0.7), rtol=1e-9,
                               atol=1e-10)


def test_first_step_is_the_plain_model():
    vit = tiny_vit(dtype=torch.float64)
    x = images(dtype=torch.float64)
    plain = vit(x)
    method = ak.methods.create("evit", vit)
    method.model.train()
    with token_counts(vit) as counts:
        torch.testing.assert_close(method.model(x), plain, rtol=1e-9, atol=1e-10)
    assert counts["mlp"] == [17] * 4  # keep rate 1: nothing fused, no token added


@pytest.mark.parametrize("rho, schedule, warmup", [(0.7, 5, 0), (0.5, 6, 2), (0.6, 0, 3)])
def test_cosine_schedule(rho, schedule, warmup):
    method = ak.methods.create("evit", tiny_vit(), keep_rate=rho, schedule_steps=schedule, warmup_steps=warmup)
    method.model.train()
    for t in range(schedule + warmup + 3):
        with method.step(update=False) as rate:  # measuring a step does not move the schedule
            pass
        with method.step() as again:
            assert rate == again == pytest.approx(_cosine(t, rho, schedule, warmup), abs=1e-12)
            assert method.model.training_keep_rate == again
    assert method.model.training_keep_rate == rho and method.model.keep_rate == rho


def test_state_round_trip_resumes_the_schedule():
    method = ak.methods.create("evit", tiny_vit(), schedule_steps=6, warmup_steps=1)
    _advance(method, 3)
    state = method.state_dict()
    resumed = ak.methods.create("evit", tiny_vit(seed=4), schedule_steps=6, warmup_steps=1)
    resumed.load_state_dict(state)
    assert resumed.step_count == 3 and resumed.model.training_keep_rate == method.model.training_keep_rate
    resumed.model.train()
    for _ in range(5):
        with method.step() as a, resumed.step() as b:
            assert a == b


@pytest.mark.parametrize("option, value", [("keep_rate", 0.5), ("schedule_steps", 7), ("warmup_steps", 0),
                                           ("fuse_layers", (1, 2))])
def test_state_from_another_configuration_is_refused(option, value):
    saved = ak.methods.create("evit", tiny_vit(), schedule_steps=6, warmup_steps=1).state_dict()
    other = ak.methods.create("evit", tiny_vit(), **{"schedule_steps": 6, "warmup_steps": 1, option: value})
    with pytest.raises(ValueError, match=option):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict({"method": "sparse_tuning"})


def test_every_parameter_trains():
    vit = tiny_vit(reg_tokens=2)
    method = ak.methods.create("evit", vit, schedule_steps=2)
    model = method.model
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.parameters()} == {id(p) for p in vit.parameters()}
    _advance(method, 2)  # the fuse is on: gradients flow through the fused tokens too
    F.cross_entropy(model(images()), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    train(method, steps=2)
    after = snapshot(model)
    assert [n for n in before if torch.equal(before[n], after[n])] == []


def test_tokens_per_block_follow_the_keep_rate():
    vit = tiny_vit()
    method = ak.methods.create("evit", vit, schedule_steps=3)
    x = images()
    method.model.eval()  # ρ = 0.7 at any step
    with token_counts(vit) as counts:
        method.model(x)
    assert counts["mlp"] == [17, 14, 12, 10]
    _advance(method, 3)
    method.model.train()
    with token_counts(vit) as counts:
        method.model(x)
    assert counts["mlp"] == [17, 14, 12, 10]


def test_step_needs_training_mode():
    method = ak.methods.create("evit", tiny_vit())
    method.model.eval()
    with pytest.raises(RuntimeError, match="train"):
        with method.step():
            pass


@pytest.mark.parametrize("option, value", [("keep_rate", 0), ("keep_rate", True), ("schedule_steps", -1),
                                           ("schedule_steps", 2.5), ("warmup_steps", -3), ("fuse_layers", (4,))])
def test_bad_options_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=f"^{option}:"):
        ak.methods.create("evit", tiny_vit(), **{option: value})


@pytest.mark.parametrize("name", ["evit", "sparse_tuning"])
def test_a_vit_without_class_token_is_refused(name):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5,
                            class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="^model:.*class token"):
        ak.methods.create(name, vit)
