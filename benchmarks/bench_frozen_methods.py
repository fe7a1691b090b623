"""One training step on the CPU: full fine-tuning vs the frozen-backbone methods ``losa`` and ``synqt``.

Two models: ``vit_small_patch16_224`` (batch 16, 224²) and the job's model (``vit_tiny_patch16_224`` at 48²
with 8-pixel patches and 6 blocks, batch 32). float32, SGD over each method's trainable parameters, all
variants from the same weights on the same batch. Targets (issue 9): FLOPs per step ≤ 0.5× full, saved
activation bytes ≤ 0.3× full. Besides the totals it records what the rest is made of: the frozen
forward's FLOPs, and the per-layer features autograd keeps (LoSA: each side layer's input; SynQT: each
block's keys and values).

``make bench`` measures both models, times the steps (interleaved medians) and writes
``benchmarks/results/cpu_frozen_methods_<model>.json``; ``make test`` runs the job's model once as a smoke
(batch 8, counts only) and asserts the deterministic targets (vit_small, about a minute on 2 cores, is
skipped there).
"""
from __future__ import annotations

import copy
from typing import Optional

import pytest
import timm
import torch
import torch.nn.functional as F

import alast_kernels as ak
from alast_kernels.measure import count_flops, median_seconds, saved_activation_bytes

from record import write_results
from smoke import one_thread_for_the_smoke  # noqa: F401  (a fixture, used through pytestmark)

CONFIGS = {
    "vit_small": {"model": "vit_small_patch16_224", "options": {}, "batch": 16},
    "job": {"model": "vit_tiny_patch16_224", "options": {"img_size": 48, "patch_size": 8, "depth": 6},
            "batch": 32},
}
CLASSES = 100
METHODS = ("full", "losa", "synqt")
TARGETS = {"flops": 0.5, "saved_bytes": 0.3}


pytestmark = pytest.mark.usefixtures("one_thread_for_the_smoke")


class Variant:
    def __init__(self, name, model, x, y):
        self.method = ak.methods.create(name, model)
        self.method.model.train()
        self.x, self.y = x, y
        self.optimizer = torch.optim.SGD(self.method.trainable_parameters(), lr=1e-3)

    def loss(self):
        return F.cross_entropy(self.method.model(self.x), self.y)

    def step(self):
        with self.method.step():
            self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def counts(self) -> dict:
        model = self.method.model
        out = {"flops": count_flops(self.step), "saved_bytes": saved_activation_bytes(self.loss, model.parameters()),
               "trainable_parameters": self.method.num_trainable()}
        if self.method.name != "full":
            with torch.no_grad():
                out["frozen_forward_flops"] = count_flops(lambda: model.backbone_features(self.x))
            # What autograd keeps per layer: LoSA each side layer's (B, N, D) input, SynQT each block's keys
            # and values — the same numbers of elements as the feature cache stores per image.
            per_image = 1
            for s in model.feature_shape():
                per_image *= s
            out["kept_features_bytes"] = per_image * self.x.shape[0] * self.x.element_size()
        return out


def measure(config: str, repeats: int, warmup: int, batch: Optional[int] = None) -> dict:
    spec = {**CONFIGS[config], **({"batch": batch} if batch else {})}
    torch.manual_seed(0)
    base = timm.create_model(spec["model"], pretrained=False, num_classes=CLASSES, **spec["options"])
    size = base.patch_embed.img_size
    x = torch.randn(spec["batch"], 3, *size)
    y = torch.randint(0, CLASSES, (spec["batch"],))
    variants = {name: Variant(name, copy.deepcopy(base), x, y) for name in METHODS}
    result = {"model": spec["model"], "options": spec["options"], "batch": spec["batch"], "image": list(size),
              "dtype": "float32", "threads": torch.get_num_threads(), "repeats": repeats,
              "backbone_parameters": sum(p.numel() for p in base.parameters())}
    for name, v in variants.items():
        result[name] = v.counts()
    if repeats:
        seconds = median_seconds([v.step for v in variants.values()], repeats=repeats, warmup=warmup)
        for name, s in zip(variants, seconds):
            result[name]["seconds"] = s
    full = result["full"]
    for name in METHODS[1:]:
        ours = result[name]
        ours["ratios"] = {"flops": ours["flops"] / full["flops"],
                          "saved_bytes": ours["saved_bytes"] / full["saved_bytes"]}
        if repeats:
            ours["ratios"]["time"] = ours["seconds"] / full["seconds"]
        ours["share_of_flops_frozen_forward"] = ours["frozen_forward_flops"] / ours["flops"]
        ours["share_of_saved_kept_features"] = ours["kept_features_bytes"] / ours["saved_bytes"]
    return result


@pytest.mark.parametrize("config", list(CONFIGS))
def test_frozen_methods_vs_full(benchmark, config):
    if benchmark.disabled and config == "vit_small":
        pytest.skip("vit_small takes about a minute on 2 CPU cores: measured by `make bench`")
    # The smoke: counts only, on a small batch.
    args = (config, 0, 0, 8) if benchmark.disabled else (config, 5, 1)
    result = benchmark.pedantic(measure, args=args, rounds=1, iterations=1)
    for name in METHODS[1:]:
        ratios = result[name]["ratios"]
        assert ratios["flops"] <= TARGETS["flops"], (name, ratios)
        assert ratios["saved_bytes"] <= TARGETS["saved_bytes"], (name, ratios)
    if not benchmark.disabled:
        write_results(f"cpu_frozen_methods_{config}", {**result, "targets": TARGETS})
