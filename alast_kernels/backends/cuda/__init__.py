"""The cuda backend: the compiled kernels of ``alast_kernels._C`` (``torch.ops.alast``) on CUDA tensors.

Importing this module loads the extension; when it was not built, was built for another torch/CUDA/Python
or fails to load, the import raises ``ImportError`` (after one warning naming both sides, see
:mod:`alast_kernels._extension`) and the backend switch falls back to ``triton``/``reference``.
Ops without a CUDA kernel here (``gather_layer_norm``, ``attention``, the masked linear layers) are absent
from :data:`OPS`, so the switch takes them from the next backend in the auto order. Implementations take
their arguments already checked by :mod:`alast_kernels.ops`; float64 inputs, which the kernels do not
take, run the reference implementation.
"""
import torch

from ..._extension import load as _load_extension

_load_extension()

from . import fake  # noqa: E402  (registers the fake kernels once the ops exist)
from .scores import cls_scores  # noqa: E402
from .select import select_tokens  # noqa: E402
from .tokens import gather_tokens, scatter_tokens  # noqa: E402

OPS = {
    "select_tokens": select_tokens,
    "gather_tokens": gather_tokens,
    "scatter_tokens": scatter_tokens,
    "cls_scores": cls_scores,
}


def supports(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"
