"""Softmax attention, optionally with the class token's head-averaged probability row."""
import torch
import torch.nn.functional as F

from ..support import implements


def cls_probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head mean of ``softmax(q[:, :, 0] · kᵀ · scale)``: ``(B, Nk)``, float32 (float64 for float64)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):  # in `cdt` under autocast too
        logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].to(cdt), k.to(cdt)) * scale
        return logits.softmax(dim=-1).mean(dim=1)


@implements(how="SDPA", vendor="PyTorch SDPA: its FlashAttention-2, cuDNN or memory-efficient kernels")
def attention(q, k, v, scale: float, return_cls: bool):
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if return_cls:
        return out, cls_probabilities(q, k, scale)
    return out
