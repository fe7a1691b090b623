"""cls_scores on the ``alast::cls_scores`` kernel (DESIGN.md §4).

The per-image, per-head vectors ``u = scale · ln_weight ⊙ (W_kᵀ q_cls)`` are small torch matmuls on the
class token only; the kernel then reads ``x`` once: LayerNorm statistics and ``H`` dot products per token,
softmax over tokens per head, mean over heads. The LayerNorm bias and the key bias add the same logit to
every token of a head and cancel in the softmax, so they need not reach the kernel. With a ``k_norm`` the
identity does not hold and the reference (which projects the keys) runs instead.
"""
import torch
import torch.nn.functional as F

from ..reference.scores import cls_scores as _reference


def cls_scores(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, eps, scale, q_norm, k_norm):
    """x ``(B, N, D)`` float32/float16/bfloat16 -> float32 ``(B, N)``, rows summing to 1, no gradient."""
    if k_norm is not None or x.dtype == torch.float64:
        return _reference(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, eps, scale, q_norm, k_norm)
    B, N, D = x.shape
    H, Dh = num_heads, D // num_heads
    with torch.no_grad():
        f32 = (lambda t: None if t is None else t.detach().float())
        w = qkv_weight.detach().float()
        b = f32(qkv_bias)
        cls = F.layer_norm(x[:, 0].detach().float(), (D,), f32(norm_weight), f32(norm_bias), eps)
        q = F.linear(cls, w[:D], None if b is None else b[:D]).view(B, H, Dh)
        if q_norm is not None:
            q = q_norm(q.to(x.dtype)).float()
        u = torch.einsum("bhe,hed->bhd", q, w[D:2 * D].view(H, Dh, D)) * scale
        if norm_weight is not None:
            u = u * f32(norm_weight)
        return torch.ops.alast.cls_scores(x.detach().contiguous(), u.contiguous(), float(eps))
