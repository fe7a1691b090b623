"""Class-token scores of every token without projecting every key
(docs/alast.md, "Scoring without projecting every key").

Without a ``k_norm``: the class-query vectors ``u`` (:mod:`alast_kernels.backends.class_query`, shared with
the kernels) and the standardised tokens give every logit, ``x̂_n · u[h]``. A ``k_norm`` breaks the identity:
then the keys are projected. Computed in float32 (float64 for float64 inputs) whatever the autocast state.
"""
import torch
import torch.nn.functional as F

from ..class_query import class_query_vectors
from ..support import implements


@implements(how="the class-query identity in PyTorch; keys projected with a `k_norm`")
def cls_scores(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, eps, scale, q_norm, k_norm):
    B, N, D = x.shape
    H, Dh = num_heads, D // num_heads
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        if k_norm is None:
            u = class_query_vectors(x, norm_weight, norm_bias, qkv_weight, qkv_bias, H, eps, scale, q_norm, cdt)
            standardised = F.layer_norm(x.detach().to(cdt), (D,), None, None, eps)
            logits = torch.einsum("bnd,bhd->bhn", standardised, u)
        else:
            cast = (lambda t: None if t is None else t.detach().to(cdt))
            h = F.layer_norm(x.detach().to(cdt), (D,), cast(norm_weight), cast(norm_bias), eps)
            w, b = qkv_weight.detach().to(cdt), cast(qkv_bias)
            q = F.linear(h[:, 0], w[:D], None if b is None else b[:D]).view(B, H, Dh)
            if q_norm is not None:
                q = q_norm(q.to(x.dtype)).to(cdt)
            keys = F.linear(h, w[D:2 * D], None if b is None else b[D:2 * D]).view(B, N, H, Dh)
            keys = k_norm(keys.transpose(1, 2).to(x.dtype)).to(cdt)
            logits = torch.einsum("bhe,bhne->bhn", q, keys) * scale
        return logits.softmax(dim=-1).mean(dim=1)
