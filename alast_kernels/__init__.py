"""alast_kernels: Adaptive Layer Selection Fine-Tuning (ALaST) for timm Vision Transformers.

``convert(model)`` makes a timm ``VisionTransformer``'s blocks plannable, ``ALaST(model, ...)`` plans
them every step, and :mod:`alast_kernels.ops` holds the fused ops behind them, with the backend chosen
by :func:`set_backend` or ``ALAST_BACKEND``.
"""
from . import ops
from ._version import __version__
from .backend import get_backend, set_backend
from .block import BlockPlan, ViTBlock
from .controller import ALaST, StepPlan
from .convert import convert, restore

__all__ = ["ALaST", "BlockPlan", "StepPlan", "ViTBlock", "convert", "restore", "ops", "set_backend",
           "get_backend", "__version__"]
