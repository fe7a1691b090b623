"""alast_kernels: Adaptive Layer Selection Fine-Tuning (ALaST) for timm Vision Transformers.

``convert(model)`` makes a timm ``VisionTransformer``'s blocks plannable, ``ALaST(model, ...)`` plans
them every step, and :mod:`alast_kernels.ops` holds the fused ops behind them, with the backend chosen
by :func:`set_backend` or ``ALAST_BACKEND``.
"""
from . import _extension, methods, ops
from ._version import __version__
from .backend import get_backend, set_backend
from .block import BlockPlan, ViTBlock
from .controller import ALaST, StepPlan
from .convert import convert, restore

# Cheap (no shared library is loaded): warns once if the compiled extension was built for another
# torch/CUDA/Python; the cuda backend is then skipped.
_extension.check_build()

__all__ = ["ALaST", "BlockPlan", "StepPlan", "ViTBlock", "convert", "restore", "methods", "ops", "set_backend",
           "get_backend", "__version__"]
