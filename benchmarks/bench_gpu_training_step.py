"""One training step of ``vit_base_patch16_224`` on a GPU: full fine-tuning vs ALaST (issue 3's target).

Batch 128, 224², bfloat16 autocast, AdamW; ALaST at ``token_budget=0.5`` with 9 of 12 blocks trained and
the ``auto`` backend — the steps of ``gpu_training.py`` (which ``make gpu-check`` runs for every method).
Targets: ALaST ≥ 1.6× faster than full fine-tuning (timm's blocks with SDPA), peak memory ≤ 0.5×. Skipped
without a CUDA device. ``make bench`` on a GPU machine writes ``benchmarks/results/gpu_training_step.json``.
"""
from __future__ import annotations

import pytest
import torch

import alast_kernels as ak
from alast_kernels.measure import median_seconds, peak_cuda_memory

from gpu_training import BATCH, MODEL, OPTIONS, inputs, make_step, start_model
from record import write_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGETS = {"speedup": 1.6, "peak_memory": 0.5}


@pytest.fixture(scope="module")
def steps():
    start, (x, y) = start_model(), inputs()
    return {name: make_step(name, start, x, y)[1] for name in ("full", "alast")}


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
            "model": MODEL, "batch": BATCH, "dtype": "bfloat16 autocast", "options": OPTIONS["alast"],
            "backend": ak.get_backend(), "milliseconds": ms,
            "peak_memory_bytes": memory, "ratios": ratios, "targets": TARGETS,
            "met": {"speedup": ratios["speedup"] >= TARGETS["speedup"],
                    "peak_memory": ratios["peak_memory"] <= TARGETS["peak_memory"]},
        })
