"""One training step of ``vit_base_patch16_224`` on a GPU: full fine-tuning vs ALaST (issue 3's target).

Batch 128, 224², bfloat16 autocast, AdamW; ALaST at ``token_budget=0.5`` with 9 of 12 blocks trained and
the ``auto`` backend (fused kernels where available). Targets: ALaST ≥ 1.6× faster than timm's own full
fine-tuning step with SDPA, peak memory ≤ 0.5×. Skipped without a CUDA device. ``make bench`` on a GPU
machine writes ``benchmarks/results/gpu_training_step.json``.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import alast_kernels as ak
from alast_kernels.measure import median_seconds, peak_cuda_memory

from record import write_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODEL, BATCH, IMAGE, CLASSES = "vit_base_patch16_224", 128, 224, 100
TOKEN_BUDGET, TRAIN_LAYERS = 0.5, 9
TARGETS = {"speedup": 1.6, "peak_memory": 0.5}


@pytest.fixture(scope="module")
def steps():
    torch.manual_seed(0)
    device = torch.device("cuda")
    full_model = timm.create_model(MODEL, pretrained=False, num_classes=CLASSES).to(device).train()
    alast_model = ak.convert(copy.deepcopy(full_model))
    controller = ak.ALaST(alast_model, token_budget=TOKEN_BUDGET, train_layers=TRAIN_LAYERS)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)

    def make_step(model, ctrl):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            if ctrl is None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
            else:
                with ctrl.step():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = F.cross_entropy(model(x), y)
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    return {"full": make_step(full_model, None), "alast": make_step(alast_model, controller)}


@pytest.mark.parametrize("name", ["full", "alast"])
def test_gpu_training_step(benchmark, steps, name):
    benchmark.group = f"{MODEL} training step, batch {BATCH}, bf16 autocast"
    step = steps[name]
    step()
    benchmark.extra_info["peak_memory_bytes"] = peak_cuda_memory(step)
    benchmark(lambda: (step(), torch.cuda.synchronize()))


def test_gpu_alast_vs_full(benchmark, steps):
    repeats = 3 if benchmark.disabled else 20
    for step in steps.values():  # warm-up: kernels compiled, allocator settled
        step(), step()
    memory = {name: peak_cuda_memory(step) for name, step in steps.items()}
    seconds = benchmark.pedantic(lambda: median_seconds(list(steps.values()), repeats=repeats, warmup=0),
                                 rounds=1, iterations=1)
    ms = {name: s * 1e3 for name, s in zip(steps, seconds)}
    ratios = {"speedup": ms["full"] / ms["alast"], "peak_memory": memory["alast"] / memory["full"]}
    benchmark.extra_info.update(ratios)
    if not benchmark.disabled:
        write_results("gpu_training_step", {
            "model": MODEL, "batch": BATCH, "dtype": "bfloat16 autocast", "token_budget": TOKEN_BUDGET,
            "train_layers": TRAIN_LAYERS, "backend": ak.get_backend(), "milliseconds": ms,
            "peak_memory_bytes": memory, "ratios": ratios, "targets": TARGETS,
            "met": {"speedup": ratios["speedup"] >= TARGETS["speedup"],
                    "peak_memory": ratios["peak_memory"] <= TARGETS["peak_memory"]},
        })
