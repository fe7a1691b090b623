"""ALaST across processes: two ranks under torchrun (gloo, CPU), each on its own batches, for 20 steps, with
DistributedDataParallel and with FSDP2 (``fully_shard``).

Every rank must make the same plan at every step (for every policy and token mode, even with another seed
per rank),
keep the blocks it freezes unchanged, and end with the same parameters; with the ``fixed`` plan that keeps
every token and trains every block, the result equals one process training on both ranks' batches.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import alast_kernels as ak
import ddp_worker

pytestmark = pytest.mark.distributed

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
TIMEOUT = 180  # seconds for the whole two-process run


def run_ranks(tmp_path, *args, world=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           WORKER, "--out", str(tmp_path), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("policy,extra", [("alast", []), ("alast", ["--sample"]), ("paper", ["--freeze-embeddings"]),
                                          ("alast", ["--sample", "--fsdp"]),
                                          ("alast", ["--sample", "--tokens", "drop"]),
                                          ("paper", ["--tokens", "carry"])],
                         ids=["alast", "alast-sampled", "paper-frozen-embeddings", "fsdp2-alast-sampled",
                              "alast-sampled-drop", "paper-carry"])
def test_every_rank_makes_the_same_plan_and_frozen_blocks_do_not_move(tmp_path, policy, extra):
    r0, r1 = run_ranks(tmp_path, "--policy", policy, "--seed-per-rank", *extra)
    assert len(r0["plans"]) == 20
    assert r0["plans"] == r1["plans"]
    assert r0["budgets"] == r1["budgets"]
    assert len({tuple(t) for _, t, _ in r0["plans"]}) > 1 or len({tuple(k) for _, _, k in r0["plans"]}) > 1
    assert all(r0["frozen_unchanged"]) and all(r1["frozen_unchanged"])
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name


def test_the_harness_sees_ranks_that_plan_on_their_own(tmp_path):
    r0, r1 = run_ranks(tmp_path, "--policy", "alast", "--sample", "--seed-per-rank", "--no-agreement")
    assert r0["plans"] != r1["plans"]


@pytest.mark.parametrize("wrapper", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_fixed_full_plan_equals_one_process_on_both_batches(tmp_path, wrapper):
    # SGD: AdamW would turn the rounding noise of gradients that are zero in exact arithmetic (the key
    # bias's) into full-size steps of either sign, in both runs alike but not identically.
    r0, r1 = run_ranks(tmp_path, "--policy", "fixed", "--sgd", *wrapper)
    model = ddp_worker.tiny_vit()
    ctrl = ak.ALaST(copy.deepcopy(model), policy="fixed", keep_ratios=[1.0] * 4, train=[True] * 4,
                    train_embeddings=True)
    model = ctrl.model
    opt = ddp_worker.make_optimizer(model.parameters(), sgd=True)
    for (x0, y0), (x1, y1) in zip(ddp_worker.local_batches(0, 20, 4), ddp_worker.local_batches(1, 20, 4)):
        with ctrl.step():
            F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert (p - r0["params"][name]).abs().max().item() <= 1e-4, name
