"""One training step of ``vit_small_patch16_224`` on the CPU: full fine-tuning vs ALaST.

Batch 16, 224², float32; ALaST at ``token_budget=0.6`` with 9 of 12 blocks trained. Both variants start
from the same weights and take the same batch; a step is forward, backward and an SGD update.

``make bench`` times them (pytest-benchmark) and runs the side-by-side comparison, which writes
``benchmarks/results/cpu_training_step.json``; ``make test`` runs everything once as a smoke
(``--benchmark-disable``) and checks the deterministic targets (FLOPs and saved activation bytes).
Targets (issue 2): FLOPs ≤ 0.6× full, saved activation bytes ≤ 0.5× full, wall time ≤ 0.7× full,
controller overhead ≤ 2% of the ALaST step. Wall time is recorded, not asserted.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import alast_kernels as ak
from alast_kernels.measure import count_flops, median_seconds, saved_activation_bytes

from record import write_results

MODEL, BATCH, IMAGE, CLASSES = "vit_small_patch16_224", 16, 224, 100
TOKEN_BUDGET, TRAIN_LAYERS = 0.6, 9
TARGETS = {"flops": 0.6, "saved_bytes": 0.5, "time": 0.7, "controller_overhead": 0.02}


class Variant:
    """A model, its optimizer and one training step on a fixed batch."""

    def __init__(self, model, x, y, controller=None):
        self.model, self.x, self.y, self.controller = model, x, y, controller
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def forward_loss(self):
        return F.cross_entropy(self.model(self.x), self.y)

    def step(self):
        if self.controller is None:
            self.forward_loss().backward()
        else:
            with self.controller.step():
                self.forward_loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def saved_bytes(self):
        """Activation bytes saved for backward by one forward under this step's plan."""
        if self.controller is None:
            return saved_activation_bytes(self.forward_loss, self.model.parameters())
        with self.controller.step():
            saved = saved_activation_bytes(self.forward_loss, self.model.parameters())
            self.forward_loss().backward()  # completes the step so the controller updates as usual
        self.optimizer.zero_grad(set_to_none=True)
        return saved


@pytest.fixture(scope="module")
def variants():
    torch.manual_seed(0)
    full_model = timm.create_model(MODEL, pretrained=False, num_classes=CLASSES)
    alast_model = ak.convert(copy.deepcopy(full_model))
    full_model.train(), alast_model.train()
    controller = ak.ALaST(alast_model, token_budget=TOKEN_BUDGET, train_layers=TRAIN_LAYERS)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE)
    y = torch.randint(0, CLASSES, (BATCH,))
    return {"full": Variant(full_model, x, y), "alast": Variant(alast_model, x, y, controller)}


@pytest.fixture(scope="module")
def counts(variants):
    """FLOPs of a whole step and saved activation bytes of a forward, per variant (deterministic)."""
    return {name: {"flops": count_flops(v.step), "saved_bytes": v.saved_bytes()} for name, v in variants.items()}


@pytest.mark.parametrize("name", ["full", "alast"])
def test_training_step(benchmark, variants, counts, name):
    benchmark.group = f"{MODEL} training step, batch {BATCH}, CPU float32"
    benchmark.extra_info.update(counts[name])
    benchmark(variants[name].step)


def test_alast_vs_full(benchmark, variants, counts):
    """Both variants interleaved in one run; FLOPs and saved-bytes targets asserted, time recorded."""
    full, alast = variants["full"], variants["alast"]
    repeats, warmup = (1, 0) if benchmark.disabled else (5, 1)

    def compare():
        overhead_before = alast.controller.overhead_seconds
        t_full, t_alast = median_seconds([full.step, alast.step], repeats=repeats, warmup=warmup)
        overhead = (alast.controller.overhead_seconds - overhead_before) / (repeats + warmup)
        return t_full, t_alast, overhead

    t_full, t_alast, overhead = benchmark.pedantic(compare, rounds=1, iterations=1)
    last = alast.controller.history[-1]
    ratios = {
        "flops": counts["alast"]["flops"] / counts["full"]["flops"],
        "saved_bytes": counts["alast"]["saved_bytes"] / counts["full"]["saved_bytes"],
        "time": t_alast / t_full,
        "controller_overhead": overhead / t_alast,
    }
    benchmark.extra_info.update({f"ratio_{k}": v for k, v in ratios.items()})
    assert math.isclose(sum(last["keep_ratio"]) / len(last["keep_ratio"]), TOKEN_BUDGET, rel_tol=1e-9)
    assert sum(last["train"]) == TRAIN_LAYERS
    assert ratios["flops"] <= TARGETS["flops"], ratios
    assert ratios["saved_bytes"] <= TARGETS["saved_bytes"], ratios
    if not benchmark.disabled:
        write_results("cpu_training_step", {
            "model": MODEL, "batch": BATCH, "image": IMAGE, "dtype": "float32",
            "token_budget": TOKEN_BUDGET, "train_layers": TRAIN_LAYERS, "repeats": repeats,
            "threads": torch.get_num_threads(),
            "full": {**counts["full"], "seconds": t_full},
            "alast": {**counts["alast"], "seconds": t_alast, "controller_seconds": overhead,
                      "keep_ratio": last["keep_ratio"], "train": last["train"]},
            "ratios": ratios, "targets": TARGETS,
            "met": {k: ratios[k] <= TARGETS[k] for k in TARGETS},
        })
