"""The cuda backend: the compiled kernels of ``alast_kernels._C`` (``torch.ops.alast``) on CUDA tensors, or,
under ``ALAST_CUDA_EMULATION=1``, the same kernels compiled for the host on CPU tensors
(:mod:`alast_kernels._cuda_emulation`).

Importing this module loads the library; when it was not built, was built for another torch/CUDA/Python
or fails to load, the import raises ``ImportError`` (after one warning naming both sides, see
:mod:`alast_kernels._extension`) and the dispatcher uses ``triton``/``reference`` instead. Ops without a
CUDA kernel here (``gather_layer_norm``, ``attention``, the masked linear layers) are absent from
:data:`OPS`; :data:`SUPPORTS` declares what the others run (float32/float16/bfloat16, scores without
``k_norm``). Implementations take their arguments already checked by :mod:`alast_kernels.ops`.
"""
from dataclasses import replace
from typing import Optional

from ... import _cuda_emulation, _extension
from ..support import Supports

_extension.load()

from . import fake  # noqa: E402,F401  (registers the fake kernels once the ops exist)
from .scores import cls_scores  # noqa: E402
from .select import select_tokens  # noqa: E402
from .tokens import gather_tokens, scatter_tokens  # noqa: E402

OPS = {
    "select_tokens": select_tokens,
    "gather_tokens": gather_tokens,
    "scatter_tokens": scatter_tokens,
    "cls_scores": cls_scores,
}

EMULATED = _cuda_emulation.loaded()
DEVICES_NOTE = "CUDA tensors; CPU tensors under `ALAST_CUDA_EMULATION=1`"
DEFAULT_SUPPORT = Supports(devices=("cuda", "cpu"))
SUPPORTS = {
    "select_tokens": replace(DEFAULT_SUPPORT, how="radix select in shared memory (N ≤ 4096 cached, longer rows "
                                                  "from global memory), output already ascending"),
    "gather_tokens": replace(DEFAULT_SUPPORT, how="16-byte row copy; backward without atomics"),
    "scatter_tokens": replace(DEFAULT_SUPPORT, how="one write per output row, 16-byte vectors"),
    "cls_scores": replace(DEFAULT_SUPPORT, k_norm=False, how="one warp per token, one block per image for the "
                                                             "softmax"),
}


def device_refusal(device_type: str) -> Optional[str]:
    """CUDA tensors with the compiled extension; CPU tensors with the emulation; never both in one process."""
    if device_type == "cpu" and not EMULATED:
        return "CPU tensors run only under the CUDA emulation (ALAST_CUDA_EMULATION=1)"
    if device_type == "cuda" and EMULATED:
        return "the CUDA emulation is loaded in this process: CPU tensors only"
    return None
