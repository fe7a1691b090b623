"""Shared helpers for the token-fuse method tests (``test_sparse_tuning.py``, ``test_evit.py``)."""
from __future__ import annotations

import contextlib
from typing import Dict, List

import timm
import torch
import torch.nn.functional as F


def tiny_vit(reg_tokens: int = 0, seed: int = 0, dtype=torch.float32):
    """A 4-block ViT-Tiny on 32x32 images in 8x8 patches: 16 patches, 1 + ``reg_tokens`` prefix tokens, D = 192."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=5,
                              reg_tokens=reg_tokens)
    return model.to(dtype)


def images(seed: int = 0, batch: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


@contextlib.contextmanager
def token_counts(vit):
    """Records the tokens reaching each block (``norm1``'s input) and its MLP (``norm2``'s input).

    A hooked norm is called as a module by ViTBlock, so the hook sees exactly what the block computes on.
    """
    counts: Dict[str, List[int]] = {"block": [], "mlp": []}
    handles = []
    for blk in vit.blocks:
        handles.append(blk.norm1.register_forward_pre_hook(lambda m, a: counts["block"].append(a[0].shape[1])))
        handles.append(blk.norm2.register_forward_pre_hook(lambda m, a: counts["mlp"].append(a[0].shape[1])))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def train(method, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    """A few AdamW steps (with weight decay) on random images and labels, through ``method.step()``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=lr, weight_decay=0.05)
    method.model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 5, (4,), generator=gen)
        with method.step():
            F.cross_entropy(method.model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def snapshot(module) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}
