"""What ``losa`` and ``synqt`` share: a frozen backbone without a graph whose weights never change, state
round-trips, DDP, costs against full fine-tuning, argument checks."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import alast_kernels as ak
from alast_kernels.measure import count_flops, saved_activation_bytes
from alast_kernels.vit import head_parameters
from frozen_testing import METHODS, create, images, perturb_trainable, tiny_vit


def _backbone_parameters(method):
    """Everything in the ViT but its classifier head (which SynQT and LoSA train)."""
    head = {id(p) for p in head_parameters(method.vit)}
    return {n: p for n, p in method.vit.named_parameters() if id(p) not in head}


@pytest.mark.parametrize("name", METHODS)
def test_backbone_gets_no_gradient_and_never_changes(name):
    method = create(name, tiny_vit(reg_tokens=2, drop_rate=0.1, drop_path_rate=0.2))
    backbone = _backbone_parameters(method)
    before = {n: p.detach().clone() for n, p in backbone.items()}
    trainable_before = [p.detach().clone() for p in method.trainable_parameters()]
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    y = torch.tensor([0, 1, 2, 3])
    for step in range(3):
        with method.step():
            F.cross_entropy(method.model(images(4, seed=step)), y).backward()
        assert all(p.grad is None for p in backbone.values())
        assert all(not p.requires_grad for p in backbone.values())
        assert all(p.grad is not None for p in method.trainable_parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in backbone.items():
        assert torch.equal(p, before[n]), n
    assert all(not torch.equal(p, b) for p, b in zip(method.trainable_parameters(), trainable_before))


@pytest.mark.parametrize("name", METHODS)
def test_backbone_runs_without_graph_in_eval_mode(name):
    """Dropout/drop-path set on the model are off in the backbone, and its blocks build no graph."""
    method = create(name, tiny_vit(drop_rate=0.5, drop_path_rate=0.5))
    method.model.train()
    assert method.model.training and not method.vit.training
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((m.training, out.requires_grad)))
             for b in method.vit.blocks]
    perturb_trainable(method)
    x = images(2)
    out = method.model(x)
    for h in hooks:
        h.remove()
    assert seen and all(not training and not grad for training, grad in seen)
    assert out.requires_grad
    torch.testing.assert_close(method.model(x), out, rtol=0, atol=0)  # deterministic in training mode


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name):
    method = create(name, tiny_vit(reg_tokens=2, seed=0))
    perturb_trainable(method)
    other = create(name, tiny_vit(reg_tokens=2, seed=5))
    x = images(3)
    assert not torch.allclose(other.model(x), method.model(x))
    other.model.load_state_dict(method.model.state_dict())
    other.load_state_dict(method.state_dict())
    torch.testing.assert_close(other.model(x), method.model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="^state:"):
        other.load_state_dict(create("full", tiny_vit()).state_dict())


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", METHODS)
def test_ddp_wrapped_model(process_group, name):
    """``method.model`` inside DistributedDataParallel (gloo, one process): same loss and gradients."""
    method = create(name, tiny_vit(reg_tokens=2))
    perturb_trainable(method)
    plain = copy.deepcopy(method.model)
    ddp = DistributedDataParallel(method.model)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(ddp(x), y)
    loss.backward()
    plain_loss = F.cross_entropy(plain(x), y)
    plain_loss.backward()
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    plain_grads = [p.grad for p in plain.parameters() if p.requires_grad]
    for a, b in zip(method.trainable_parameters(), plain_grads):
        torch.testing.assert_close(a.grad, b, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def job_costs():
    """FLOPs of one training step and saved activation bytes, full fine-tuning vs each method, on the
    job's model (vit_tiny, 48², patch 8, depth 6) with a batch of 8."""
    torch.manual_seed(0)
    base = tiny_vit(img_size=48, depth=6, num_classes=10)
    x, y = images(8, size=48), torch.randint(0, 10, (8,))
    costs = {}
    for name in ("full",) + METHODS:
        method = create(name, copy.deepcopy(base))

        def loss(method=method):
            return F.cross_entropy(method.model(x), y)

        costs[name] = {"flops": count_flops(lambda: loss().backward()),
                       "saved": saved_activation_bytes(loss, method.model.parameters())}
    return costs


@pytest.mark.parametrize("name", METHODS)
def test_costs_against_full_fine_tuning(job_costs, name):
    """Issue 9's targets: saved-for-backward bytes ≤ 0.3× and FLOPs per step ≤ 0.5× full fine-tuning."""
    full, ours = job_costs["full"], job_costs[name]
    assert ours["flops"] <= 0.5 * full["flops"], ours["flops"] / full["flops"]
    assert ours["saved"] <= 0.3 * full["saved"], ours["saved"] / full["saved"]
    # The frozen forward alone is a third of a full step; the trainable path must stay far below the rest.
    assert ours["flops"] >= full["flops"] / 3 * 0.95


@pytest.mark.parametrize("name", METHODS)
def test_wrapped_model_and_bad_images(name):
    vit = tiny_vit()
    method = create(name, nn.Sequential(vit))
    assert method.vit is vit
    with pytest.raises(ValueError, match=r"^images: expected images of size \(32, 32\)"):
        method.model(images(2, size=48))
    with pytest.raises(ValueError, match="^images:"):
        method.model(images(2)[0])
    with pytest.raises(ValueError, match="^images:"):
        method.model(images(2).long())


def test_listed_with_summaries():
    assert {"losa", "synqt"} <= set(ak.methods.available())
    for name in METHODS:
        assert "frozen backbone" in create(name, tiny_vit()).summary
