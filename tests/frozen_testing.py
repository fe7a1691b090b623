"""Shared helpers for the frozen-backbone method tests (``test_losa.py``, ``test_synqt.py``,
``test_frozen_backbone.py``, ``test_feature_cache.py``)."""
from __future__ import annotations

import timm
import torch

import alast_kernels as ak

METHODS = ("losa", "synqt")

# Tiny timm ViTs covering the prefix-token layouts: class token; class token + 2 registers (with qk_norm and
# LayerScale); no class token, average pooling with fc_norm.
TINY_CONFIGS = {
    "cls": {},
    "cls+reg2": {"reg_tokens": 2, "qk_norm": True, "init_values": 0.1},
    "avg": {"class_token": False, "global_pool": "avg", "fc_norm": True},
}


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """``vit_tiny_patch16_224`` at 32² with 8-pixel patches, 3 blocks, 5 classes (17 tokens with a class
    token), random weights from ``seed``."""
    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=8, depth=3, num_classes=5)
    options.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **options)


def images(batch: int, size: int = 32, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def perturb_trainable(method, seed: int = 2, scale: float = 0.2) -> None:
    """Give every trainable parameter random values: zero-initialised projections would make a forward
    check blind to the paths behind them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale)


def gradcheck_trainable(method, x: torch.Tensor) -> bool:
    """``gradcheck`` of the logits against every trainable parameter of ``method`` (float64 ``x``)."""
    names = [n for n, p in method.model.named_parameters() if p.requires_grad]

    def logits(*params):
        return torch.func.functional_call(method.model, dict(zip(names, params)), (x,))

    params = [p.detach().clone().requires_grad_() for p in method.trainable_parameters()]
    return torch.autograd.gradcheck(logits, params, fast_mode=True)


def create(name: str, model, **options):
    method = ak.methods.create(name, model, **options)
    method.model.train()
    return method
