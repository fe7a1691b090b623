"""One fine-tuning run of one method, and how its costs are measured.

A run is ``steps`` AdamW steps (5% linear warm-up, then cosine decay) on seeded batches, each inside
``method.step()``. On ``probes`` evenly spaced steps one extra forward+backward on that step's batch is
measured under that step's state (``method.step(update=False)``: same plan, nothing advanced) and its
gradients dropped, so training is unchanged and the probes do not count in the wall time:

* FLOPs: ``alast_kernels.measure.count_flops`` of forward+backward (matmuls, convolutions, attention);
* memory: on the CPU the bytes autograd saves for backward during the forward
  (``saved_activation_bytes``), on CUDA the rise of the allocator's peak over forward+backward.

Wall time counts the training steps only (forward, backward, optimiser), not data, probes or evaluation.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from alast_kernels.measure import count_flops, peak_cuda_memory, saved_activation_bytes
from alast_kernels.vit import find_vit
from .digits_canvas import TensorImages, batches

__all__ = ["lr_factor", "parameter_groups", "train", "evaluate", "inference_cost", "cached_epochs"]


def lr_factor(step: int, steps: int) -> float:
    """5% linear warm-up, then cosine decay to 0."""
    warmup = max(1, round(0.05 * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorImages, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``data`` in eval mode (every token, every layer)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.images[start:start + batch_size].to(device)
        y = data.labels[start:start + batch_size].to(device)
        correct += int((model(x).argmax(-1) == y).sum())
    model.train(was_training)
    return correct / len(data)


def inference_cost(model: torch.nn.Module, data: TensorImages, device: torch.device, batch: int = 64,
                   repeats: int = 3) -> Dict:
    """FLOPs and wall time per image of an eval-mode forward on ``batch`` held-out images (median of
    ``repeats`` after one warm-up, without autograd)."""
    was_training = model.training
    model.eval()
    x = data.images[:batch].to(device)
    # Counted with autograd on (the graph is dropped unused): PyTorch's module tracker inside the counter
    # trips over views of parameters made under no_grad.
    flops = count_flops(lambda: model(x))
    times = []
    with torch.no_grad():
        for r in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            model(x)
            _sync(device)
            if r:
                times.append(time.perf_counter() - start)
    model.train(was_training)
    return {"flops_per_image": flops / len(x), "seconds_per_image": sorted(times)[len(times) // 2] / len(x)}


def _measure_step(method, model, x, y, device: torch.device) -> Dict:
    """FLOPs and activation memory of one training step on ``(x, y)``; training state left as it was."""

    def forward_backward():
        F.cross_entropy(model(x), y).backward()

    # Under DDP the probe's backward must not join the ranks' gradient reduction.
    no_sync = model.no_sync if hasattr(model, "no_sync") else contextlib.nullcontext
    with no_sync(), method.step(update=False):
        flops = count_flops(forward_backward)
    model.zero_grad(set_to_none=True)
    with no_sync(), method.step(update=False):
        if device.type == "cuda":
            memory = peak_cuda_memory(forward_backward, device)
        else:
            memory = saved_activation_bytes(lambda: F.cross_entropy(model(x), y), model.parameters())
    model.zero_grad(set_to_none=True)
    return {"flops": flops, "activation_bytes": memory}


def parameter_groups(method, lr: float, head_lr: Optional[float]) -> List[Dict]:
    """AdamW's parameter groups: every trainable parameter at ``lr``; with ``head_lr``, the classifier's
    (the ViT's ``get_classifier()``, the new head) at ``head_lr`` instead — a new head learns from scratch while
    pretrained weights only need nudging."""
    params = method.trainable_parameters()
    if head_lr is None:
        return [{"params": params, "lr": lr}]
    # The timm ViT's own classifier: method.model may wrap the ViT (EViT's token-fuse wrapper, peft).
    head = {id(p) for p in find_vit(method.model).get_classifier().parameters()}
    groups = [{"params": [p for p in params if id(p) not in head], "lr": lr},
              {"params": [p for p in params if id(p) in head], "lr": head_lr}]
    return [g for g in groups if g["params"]]


def train(method, source, *, steps: int, batch_size: int, lr: float, weight_decay: float, seed: int,
          device: torch.device, desc: str, show: bool, probes: int = 0, model: Optional[torch.nn.Module] = None,
          rank: int = 0, world: int = 1, head_lr: Optional[float] = None) -> Dict:
    """``steps`` AdamW steps of ``method`` on batches of ``source`` (the classifier at ``head_lr`` if given,
    see :func:`parameter_groups`).

    ``model`` is what is called (default ``method.model``; a DDP wrapper of it under torchrun). Every rank
    draws the same global batch of ``batch_size`` and trains on its ``rank::world`` slice.
    """
    model = method.model if model is None else model
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(method, lr, head_lr), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    probe_steps = {round(i * (steps - 1) / max(1, probes - 1)) for i in range(probes)} if probes else set()
    step_seconds, losses, measured = [], [], []
    bar = tqdm(batches(source, batch_size, steps, seed), total=steps, desc=desc, disable=not show, leave=True,
               dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = x[rank::world].to(device, non_blocking=True), y[rank::world].to(device, non_blocking=True)
        if step in probe_steps:
            measured.append({"step": step, **_measure_step(method, model, x, y, device)})
        _sync(device)
        start = time.perf_counter()
        with method.step():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        _sync(device)
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    return {"train_seconds": sum(step_seconds), "median_step_seconds": sorted(step_seconds)[len(step_seconds) // 2],
            "losses": losses, "probes": measured}


def cached_epochs(method, data: TensorImages, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                  seed: int, device: torch.device, max_bytes: int) -> Dict:
    """Epochs over fixed (not augmented) images with the method's feature cache on: the first epoch fills
    it, later ones read it. Returns each epoch's wall time and mean loss, and the cache's size.

    The images are named by their index in ``data``, the ids the cache checks them against.
    """
    cache = method.enable_feature_cache(len(data), max_bytes, device=device)
    model = method.model
    model.train()
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    seconds, losses = [], []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=g)
            _sync(device)
            start, total = time.perf_counter(), 0.0
            for i in range(0, len(data), batch_size):
                ids = order[i:i + batch_size]
                x, y = data.images[ids].to(device), data.labels[ids].to(device)
                with method.step():
                    loss = F.cross_entropy(model(x, ids=ids.to(device)), y)
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += loss.item() * len(ids)
            _sync(device)
            seconds.append(time.perf_counter() - start)
            losses.append(total / len(data))
        return {"epoch_seconds": seconds, "epoch_losses": losses, "cache_bytes": cache.nbytes,
                "speedup_epoch2": seconds[0] / seconds[1] if len(seconds) > 1 else None}
    finally:
        method.disable_feature_cache()
