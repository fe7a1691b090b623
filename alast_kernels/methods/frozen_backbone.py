"""What the frozen-backbone methods (``synqt``, ``losa``) share: a module that runs the timm ViT as a fixed
feature extractor — no autograd graph, eval mode, weights untouched — and a trainable path over its
per-image features, with the optional :class:`~alast_kernels.feature_cache.FeatureCache`.

A subclass of :class:`FrozenBackboneModel` says what one image's features are
(:meth:`~FrozenBackboneModel.feature_shape`), how the backbone computes them
(:meth:`~FrozenBackboneModel.backbone_features`) and what the trainable path makes of them
(:meth:`~FrozenBackboneModel.from_features`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..feature_cache import FeatureCache
from ..vit import embed, model_blocks, num_prefix_tokens
from .base import Method

__all__ = ["FrozenBackboneModel", "FrozenBackboneMethod", "token_count"]

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


def token_count(vit: VisionTransformer) -> int:
    """``N``: the prefix tokens plus the patches at the model's image size."""
    return num_prefix_tokens(vit) + int(vit.patch_embed.num_patches)


class FrozenBackboneModel(nn.Module):
    """``logits = model(images, ids=None)`` over a frozen timm ``VisionTransformer`` (``self.backbone``).

    images: ``(B, C, H, W)`` at the model's image size. ids: optional integer ``(B,)`` image ids for the
    feature cache (used in training mode when a cache is enabled; ignored otherwise).

    The backbone always runs in eval mode (no dropout, drop-path or patch dropout — a fixed feature
    extractor, which is also what makes cached features exact) and under ``torch.no_grad()``.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.backbone = vit
        model_blocks(vit)  # raises for a model without blocks
        if getattr(vit, "dynamic_img_size", False):
            raise NotImplementedError("dynamic_img_size: the frozen-backbone methods need a fixed image size "
                                      "(a fixed token count)")
        self.num_tokens = token_count(vit)
        self.dim = int(vit.embed_dim)
        self.feature_cache: Optional[FeatureCache] = None
        vit.eval()

    def train(self, mode: bool = True) -> "FrozenBackboneModel":
        super().train(mode)
        self.backbone.eval()
        return self

    # ----------------------------------------------------------------------------- for subclasses
    def feature_shape(self) -> Tuple[int, ...]:
        """The shape of one image's backbone features (what the cache stores per image)."""
        raise NotImplementedError

    def backbone_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Per block, ``(B, *feature_shape()[1:])`` features of ``images`` (called under ``no_grad``)."""
        raise NotImplementedError

    def from_features(self, features: Features) -> torch.Tensor:
        """Logits from the per-block features (a list, or a ``(B, L, ...)`` tensor from the cache)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- shared
    def embed_checked(self, images: torch.Tensor) -> torch.Tensor:
        """The tokens entering the first block, ``(B, N, D)``, for images of the model's size."""
        size = tuple(self.backbone.patch_embed.img_size)
        if tuple(images.shape[-2:]) != size:
            raise ValueError(f"images: expected images of size {size} ({self.num_tokens} tokens), got shape "
                             f"{tuple(images.shape)}")
        return embed(self.backbone, images)

    def _stacked_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(self.backbone_features(images), dim=1)

    def forward(self, images: torch.Tensor, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images: expected a floating (B, C, H, W) tensor, got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if self.feature_cache is not None and self.training and ids is not None:
            features = self.feature_cache.fetch(ids, images, self._stacked_features)
        else:
            with torch.no_grad():
                features = self.backbone_features(images)
        return self.from_features(features)


class FrozenBackboneMethod(Method):
    """A :class:`~alast_kernels.methods.base.Method` whose ``model`` is a :class:`FrozenBackboneModel`.

    Adds the feature cache: :meth:`feature_cache_bytes` (the size estimate), :meth:`enable_feature_cache`
    and :meth:`disable_feature_cache`.
    """

    model: FrozenBackboneModel
    backbone_training = False

    def feature_cache_bytes(self, num_images: int, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes a feature cache of ``num_images`` images would take (features in ``dtype``, by default
        the backbone's parameter dtype)."""
        return FeatureCache.bytes_needed(num_images, self.model.feature_shape(), dtype or self._dtype())

    def enable_feature_cache(self, num_images: int, max_bytes: int, device=None,
                             dtype: Optional[torch.dtype] = None) -> FeatureCache:
        """Cache the backbone's features of ``num_images`` training images (ids ``0..num_images-1``).

        Only for training data without augmentation. ``max_bytes`` is the memory limit (refused with both
        sizes when the cache would need more); ``device`` where it lives (default: the backbone's);
        ``dtype`` the features' dtype (default the parameters'; ``torch.bfloat16`` when the backbone runs
        under bfloat16 autocast). The model then takes ``method.model(images, ids=ids)``.
        """
        params = next(self.model.backbone.parameters())
        cache = FeatureCache(num_images, self.model.feature_shape(), dtype or self._dtype(),
                             params.device if device is None else device, max_bytes, what=f"{self.name} features")
        self.model.feature_cache = cache
        return cache

    def disable_feature_cache(self) -> None:
        """Drop the cache (and its memory)."""
        self.model.feature_cache = None

    def _dtype(self) -> torch.dtype:
        return next(self.model.backbone.parameters()).dtype
