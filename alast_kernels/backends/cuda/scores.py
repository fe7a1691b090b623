"""cls_scores on the ``alast::cls_scores`` kernel (docs/alast.md, "Scoring without projecting every key").

The class-query vectors ``u`` (:mod:`alast_kernels.backends.class_query`, shared by every backend) are small
torch matmuls on the class token only, computed in float32 with autocast off; the kernel then reads ``x``
once: LayerNorm statistics and ``H`` dot products per token, softmax over tokens per head, mean over heads.
"""
import torch

from ..class_query import class_query_vectors
from ..support import implements


# No k_norm: the kernel computes the class-query identity, which needs plain keys.
@implements(k_norm=False, how="one warp per token, one block per image for the softmax")
def cls_scores(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, eps, scale, q_norm, k_norm):
    """x ``(B, N, D)`` float32/float16/bfloat16 -> float32 ``(B, N)``, rows summing to 1, no gradient."""
    u = class_query_vectors(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, eps, scale, q_norm,
                            torch.float32)
    return torch.ops.alast.cls_scores(x.detach().contiguous(), u, float(eps))
