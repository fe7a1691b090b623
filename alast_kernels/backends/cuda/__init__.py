"""The cuda backend: the compiled kernels of ``alast_kernels._C`` (``torch.ops.alast``) on CUDA tensors, or,
under ``ALAST_CUDA_EMULATION=1``, the same kernels compiled for the host on CPU tensors
(:mod:`alast_kernels._cuda_emulation`).

Importing this module loads the library; when it was not built, was built for another torch/CUDA/Python
or fails to load, the import raises ``ImportError`` (after one warning naming both sides, see
:mod:`alast_kernels._extension`) and the dispatcher uses ``triton``/``reference`` instead. Ops without a
CUDA kernel here (``gather_layer_norm``, ``attention``, the masked linear layers) are absent from
:data:`OPS`; each implementation declares beside its code what it runs (``@implements``:
float32/float16/bfloat16, scores without ``k_norm``), collected into :data:`SUPPORTS`. Implementations
take their arguments already checked by :mod:`alast_kernels.ops`.
"""
from typing import Optional

from ... import _cuda_emulation, _extension
from ..support import Supports, collect

_extension.load()

from . import fake  # noqa: E402,F401  (registers the fake kernels once the ops exist)

EMULATED = _cuda_emulation.loaded()
DEVICES_NOTE = "CUDA tensors; CPU tensors under `ALAST_CUDA_EMULATION=1`"
DEFAULT_SUPPORT = Supports(devices=("cuda", "cpu"))
OPS, SUPPORTS = collect(__name__, DEFAULT_SUPPORT)  # the kernels' modules import once the library is loaded
globals().update(OPS)  # each implementation also by its op's name: `cuda.select_tokens(...)`


def device_refusal(device_type: str) -> Optional[str]:
    """CUDA tensors with the compiled extension; CPU tensors with the emulation; never both in one process."""
    if device_type == "cpu" and not EMULATED:
        return "CPU tensors run only under the CUDA emulation (ALAST_CUDA_EMULATION=1)"
    if device_type == "cuda" and EMULATED:
        return "the CUDA emulation is loaded in this process: CPU tensors only"
    return None
