"""What every method needs to know about a timm ``VisionTransformer``, found through its own attributes.

* :func:`find_vit` finds the one timm ``VisionTransformer`` inside whatever the user hands over: the model
  itself, a ``DistributedDataParallel``, a peft ``PeftModel``, a ``torch.compile`` wrapper, or a module of
  the user's that holds it.
* :func:`model_blocks`, :func:`embedding_parameters`, :func:`embed` and :func:`head` name the parts a
  method plans, freezes or re-runs, using timm's own methods (``_pos_embed``, ``forward_head``) rather than
  copies of them.
"""
from __future__ import annotations

from typing import Iterator, List

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

__all__ = ["find_vit", "model_blocks", "num_prefix_tokens", "embedding_parameters", "head_parameters", "embed", "head"]

# The parts of a VisionTransformer before its first block (timm's `group_matcher` calls them the stem).
_EMBEDDING_NAMES = ("patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "norm_pre")


def find_vit(model: nn.Module) -> VisionTransformer:
    """The timm ``VisionTransformer`` inside ``model`` (``model`` itself, or the one module in it).

    Raises ``TypeError`` naming the model's class when there is none — for a timm model of another family
    (``samvit``'s ``VisionTransformerSAM``, ``eva``, ...) it says why its blocks cannot be used — and when
    there is more than one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module holding a timm VisionTransformer, got "
                        f"{type(model).__name__}")
    found = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise TypeError(f"model: expected one timm VisionTransformer inside {type(model).__name__}, found "
                        f"{len(found)}; pass the one to fine-tune")
    inner = _innermost(model)
    blocks = getattr(inner, "blocks", None)
    block = next(iter(blocks), None) if isinstance(blocks, nn.Sequential) else None
    kind = f"{type(inner).__module__}.{type(inner).__name__}"
    if block is not None and type(block).__name__ == "Block" and not isinstance(block, Block):
        raise TypeError(f"model: {kind} is not supported: its blocks are {type(block).__module__}.Block, a "
                        f"different class from timm.models.vision_transformer.Block that alast_kernels plans; "
                        f"use a timm VisionTransformer (vit_*, deit_*, ...)")
    raise TypeError(f"model: expected a timm VisionTransformer (timm.models.vision_transformer), got {kind}")


def _innermost(model: nn.Module) -> nn.Module:
    """The model inside the usual wrappers (DDP/FSDP ``module``, peft ``base_model.model``, compile's
    ``_orig_mod``), for naming what was passed."""
    for _ in range(8):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None and hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner
    return model


def model_blocks(vit: nn.Module) -> nn.Sequential:
    """``vit.blocks``, checked to be a non-empty ``Sequential``."""
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise TypeError(f"model: expected a timm VisionTransformer with a non-empty `blocks` Sequential, "
                        f"got {type(vit).__name__}")
    return blocks


def num_prefix_tokens(vit: VisionTransformer) -> int:
    """Class, distillation and register tokens: the tokens before the patches, never dropped."""
    return int(getattr(vit, "num_prefix_tokens", 1))


def embedding_parameters(vit: VisionTransformer) -> Iterator[nn.Parameter]:
    """Parameters of the patch/position embeddings, the prefix tokens and ``norm_pre``."""
    for name in _EMBEDDING_NAMES:
        part = getattr(vit, name, None)
        if isinstance(part, nn.Parameter):
            yield part
        elif isinstance(part, nn.Module):
            yield from part.parameters()


def embed(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The token sequence entering the first block: ``(B, C, H, W)`` images -> ``(B, N, D)`` tokens."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def head(vit: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits from the last block's output ``(B, N', D)``: timm's final norm, pooling and classifier."""
    return vit.forward_head(vit.norm(tokens))


def head_parameters(vit: VisionTransformer) -> List[nn.Parameter]:
    """The parameters after the blocks: final norm, ``fc_norm``, attention pool and classifier."""
    params = []
    for name in ("norm", "fc_norm", "attn_pool", "head"):
        part = getattr(vit, name, None)
        if isinstance(part, nn.Module):
            params.extend(part.parameters())
    return params
