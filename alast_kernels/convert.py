"""Swap timm ``Block``s for :class:`ViTBlock` in place, and back.

The swap changes each block's class, not its modules: parameters, buffers, device, dtype, train/eval
mode, hooks and ``state_dict`` keys all stay as they were. The model may be wrapped (DDP, peft,
``torch.compile``): the timm ``VisionTransformer`` inside is converted.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from .block import ViTBlock, check_supported
from .distributed import is_fsdp
from .vit import find_vit, model_blocks, num_prefix_tokens

__all__ = ["convert", "restore", "PlannedBlocks"]


class PlannedBlocks(nn.Sequential):
    """A ``VisionTransformer``'s ``blocks`` after :func:`convert`: the same ``Sequential``, except that while
    an ALaST step is on, ``torch.compile`` compiles each block on its own.

    Traced as one graph, a model would be specialised on every block's plan at once (which blocks train,
    which run without a graph), and recompile for every new combination. Run block by block, each block's
    code is compiled once per kind of plan, and all blocks share those compilations. Outside a step (eval,
    plain training) the blocks trace as usual.
    """

    alast_planned: bool = False  # set by `ALaST.step()` for its duration
    # Python-side state that a scripted forward never reads (and whose postponed annotation TorchScript
    # cannot resolve once a step has set it on the instance).
    __jit_ignored_attributes__ = ["alast_planned"]

    def forward(self, x):
        if torch.jit.is_scripting():  # static to TorchScript: only this branch is compiled
            for block in self:
                x = block(x)
            return x
        if self.alast_planned:
            return _blocks_one_by_one(self, x)
        return super().forward(x)


# A graph break for the loop only: the blocks it calls are still compiled, each as its own frame.
@torch.compiler.disable(recursive=False)
def _blocks_one_by_one(blocks: nn.Sequential, x):
    for block in blocks:
        x = block(x)
    return x

_ALAST_ATTRS = ("num_prefix_tokens", "alast_plan", "alast_stats")


def convert(model: nn.Module) -> nn.Module:
    """Turn every timm ``Block`` of the ``VisionTransformer`` in ``model`` into a :class:`ViTBlock`; returns
    ``model``.

    Register tokens count as prefix tokens (``model.num_prefix_tokens``). Blocks of other types raise
    ``NotImplementedError`` naming the type; already converted blocks are left as they are.
    """
    vit = find_vit(model)
    blocks = model_blocks(vit)
    for i, blk in enumerate(blocks):
        # A ViTBlock sharded by FSDP2 (`fully_shard`) is an instance of a subclass FSDP made of it.
        if type(blk) is not Block and not isinstance(blk, ViTBlock):
            if isinstance(blk, Block) and is_fsdp(blk):
                raise NotImplementedError(f"model.blocks[{i}] was sharded by fully_shard before convert: call "
                                          f"ak.convert(model) (or create the ALaST controller) first, then shard")
            raise NotImplementedError(f"model.blocks[{i}] is a {type(blk).__name__}: convert handles timm's Block only")
        check_supported(blk)
    num_prefix = num_prefix_tokens(vit)
    if type(blocks) is nn.Sequential:
        blocks.__class__ = PlannedBlocks
    for blk in blocks:
        if type(blk) is Block:
            blk.__class__ = ViTBlock
            blk.init_alast(num_prefix)
        else:
            blk.num_prefix_tokens = num_prefix
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: every :class:`ViTBlock` of the model becomes a plain timm ``Block``."""
    blocks = model_blocks(find_vit(model))
    for blk in blocks:
        if type(blk) is ViTBlock:
            for name in _ALAST_ATTRS:
                blk.__dict__.pop(name, None)
            blk.__class__ = Block
    if type(blocks) is PlannedBlocks:
        blocks.__dict__.pop("alast_planned", None)
        blocks.__class__ = nn.Sequential
    return model
