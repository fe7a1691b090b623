"""Class-token scores of every token without projecting every key (DESIGN.md §4).

``q_cls · k_n = norm1(x_n) · (W_kᵀ q_cls) + b_k · q_cls`` per head; the second term is the same for every
token ``n`` and cancels in the softmax over tokens, so one ``D``-vector ``u = W_kᵀ q_cls`` per image and
head gives all ``N`` logits as ``norm1(x) @ u``. A ``k_norm`` breaks the identity: then keys are projected.
"""
import torch
import torch.nn.functional as F


def cls_scores(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, eps, scale, q_norm, k_norm):
    B, N, D = x.shape
    H, Dh = num_heads, D // num_heads
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Autocast off: the scores are computed in `cdt` whatever the surrounding precision.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        cast = (lambda t: None if t is None else t.detach().to(cdt))
        h = F.layer_norm(x.detach().to(cdt), (D,), cast(norm_weight), cast(norm_bias), eps)
        w = qkv_weight.detach().to(cdt)
        b = cast(qkv_bias)
        q = F.linear(h[:, 0], w[:D], None if b is None else b[:D]).view(B, H, Dh)
        if q_norm is not None:
            q = q_norm(q.to(x.dtype)).to(cdt)
        if k_norm is None:
            u = torch.einsum("bhe,hed->bhd", q, w[D:2 * D].view(H, Dh, D))
            logits = torch.einsum("bnd,bhd->bhn", h, u)
        else:
            keys = F.linear(h, w[D:2 * D], None if b is None else b[D:2 * D]).view(B, N, H, Dh)
            keys = k_norm(keys.transpose(1, 2).to(x.dtype)).to(cdt)
            logits = torch.einsum("bhe,bhne->bhn", q, keys)
        return (logits * scale).softmax(dim=-1).mean(dim=1)
