"""Swap timm ``Block``s for :class:`ViTBlock` in place, and back.

The swap changes each block's class, not its modules: parameters, buffers, device, dtype, train/eval
mode, hooks and ``state_dict`` keys all stay as they were. The model may be wrapped (DDP, peft,
``torch.compile``): the timm ``VisionTransformer`` inside is converted.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models.vision_transformer import Block

from .block import ViTBlock, check_supported
from .vit import find_vit, model_blocks, num_prefix_tokens

__all__ = ["convert", "restore"]

_ALAST_ATTRS = ("num_prefix_tokens", "alast_plan", "alast_importance", "alast_forwards", "alast_keep")


def convert(model: nn.Module) -> nn.Module:
    """Turn every timm ``Block`` of the ``VisionTransformer`` in ``model`` into a :class:`ViTBlock`; returns
    ``model``.

    Register tokens count as prefix tokens (``model.num_prefix_tokens``). Blocks of other types raise
    ``NotImplementedError`` naming the type; already converted blocks are left as they are.
    """
    vit = find_vit(model)
    blocks = model_blocks(vit)
    for i, blk in enumerate(blocks):
        if type(blk) not in (Block, ViTBlock):
            raise NotImplementedError(f"model.blocks[{i}] is a {type(blk).__name__}: convert handles timm's Block only")
        check_supported(blk)
    num_prefix = num_prefix_tokens(vit)
    for blk in blocks:
        if type(blk) is Block:
            blk.__class__ = ViTBlock
            blk.init_alast(num_prefix)
        else:
            blk.num_prefix_tokens = num_prefix
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: every :class:`ViTBlock` of the model becomes a plain timm ``Block``."""
    for blk in model_blocks(find_vit(model)):
        if type(blk) is ViTBlock:
            for name in _ALAST_ATTRS:
                blk.__dict__.pop(name, None)
            blk.__class__ = Block
    return model
