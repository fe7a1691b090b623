"""The feature cache on the CPU: an epoch that fills it against an epoch served from it, for ``losa`` and
``synqt`` on the job's model (``vit_tiny_patch16_224`` at 48², 8-pixel patches, 6 blocks).

256 un-augmented images in batches of 32, AdamW over the trainable parameters. Each round clears the
cache, runs one epoch (every batch computes the backbone and fills the cache — what a first epoch costs)
and a second one (every batch read from the cache); the reported times are medians over rounds, and an
epoch without the cache is timed in the same rounds for reference. ``make bench`` writes
``benchmarks/results/cpu_feature_cache.json``; ``make test`` runs a small smoke (8 images, one round)
that checks that the second epoch computed nothing.
"""
from __future__ import annotations

import time

import pytest
import timm
import torch
import torch.nn.functional as F

import alast_kernels as ak
from alast_kernels.feature_cache import format_bytes

from record import write_results
from smoke import one_thread_for_the_smoke  # noqa: F401  (a fixture, used through pytestmark)

MODEL, OPTIONS, CLASSES, BATCH = "vit_tiny_patch16_224", {"img_size": 48, "patch_size": 8, "depth": 6}, 5, 32
METHODS = ("losa", "synqt")


pytestmark = pytest.mark.usefixtures("one_thread_for_the_smoke")


def _epoch(method, data, labels, optimizer, use_ids: bool) -> float:
    start = time.perf_counter()
    for ids in torch.arange(len(data)).split(BATCH):
        with method.step():
            loss = F.cross_entropy(method.model(data[ids], ids=ids if use_ids else None), labels[ids])
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(name: str, num_images: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=CLASSES, **OPTIONS)
    method = ak.methods.create(name, model)
    method.model.train()
    data = torch.randn(num_images, 3, *model.patch_embed.img_size)
    labels = torch.randint(0, CLASSES, (num_images,))
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    cache = method.enable_feature_cache(num_images, max_bytes=2 << 30)
    times = {"no_cache": [], "filling": [], "cached": []}
    for _ in range(rounds):
        times["no_cache"].append(_epoch(method, data, labels, optimizer, use_ids=False))
        cache.clear()
        times["filling"].append(_epoch(method, data, labels, optimizer, use_ids=True))
        misses = cache.misses
        times["cached"].append(_epoch(method, data, labels, optimizer, use_ids=True))
        assert cache.misses == misses == num_images, "the second epoch computed the backbone"
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"images": num_images, "batch": BATCH, "rounds": rounds, "cache_bytes": cache.nbytes,
            "cache_size": format_bytes(cache.nbytes), "epoch_seconds": median,
            "speedup_epoch2_over_epoch1": median["filling"] / median["cached"],
            "speedup_cached_over_no_cache": median["no_cache"] / median["cached"]}


def test_feature_cache_epochs(benchmark):
    num_images, rounds = (8, 1) if benchmark.disabled else (256, 5)  # the smoke: one batch per epoch
    results = benchmark.pedantic(lambda: {name: measure(name, num_images, rounds) for name in METHODS},
                                 rounds=1, iterations=1)
    if not benchmark.disabled:
        write_results("cpu_feature_cache", {"model": MODEL, "options": OPTIONS, "dtype": "float32",
                                            "threads": torch.get_num_threads(), **results})
