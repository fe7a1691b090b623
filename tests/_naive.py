"""Naive float64 re-derivations of the ALaST ops, written from DESIGN.md with explicit loops and maths.

They avoid the torch functions the reference backend uses (no ``gather``/``scatter_add``,
``F.layer_norm``, ``scaled_dot_product_attention``, ``F.gelu``, ``F.linear``, ``torch.sort``), so a test
comparing the two checks the contract, not one implementation against itself.
"""
import math

import torch


def f64(t):
    return None if t is None else t.detach().to(torch.float64)


def select_tokens(scores, keep, num_prefix):
    """Prefix ``0..P-1``, then the ``keep`` best other tokens (ties to the lower index), ascending."""
    rows = []
    for row in scores.tolist():
        others = sorted(range(num_prefix, len(row)), key=lambda n: (-row[n], n))
        rows.append(list(range(num_prefix)) + sorted(others[:keep]))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), num_prefix + keep)


def gather_tokens(x, idx):
    x = f64(x)
    B, K = idx.shape
    out = torch.empty(B, K, x.shape[2], dtype=torch.float64)
    for b in range(B):
        for j in range(K):
            out[b, j] = x[b, int(idx[b, j])]
    return out


def scatter_tokens(x, idx, delta):
    out = f64(x).clone()
    delta = f64(delta)
    for b in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            out[b, int(idx[b, j])] += delta[b, j]
    return out


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim with the biased variance."""
    x = f64(x)
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * f64(weight)
    if bias is not None:
        y = y + f64(bias)
    return y


def linear(x, weight, bias):
    """``x @ weightᵀ + bias`` as an explicit sum over input features."""
    y = (f64(x).unsqueeze(-2) * f64(weight)).sum(-1)
    return y if bias is None else y + f64(bias)


def softmax(logits):
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def attention(q, k, v, scale):
    """Returns (out, cls_row): the attention output and the head mean of query 0's probabilities."""
    q, k, v = f64(q), f64(k), f64(v)
    logits = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * scale  # (B, H, Nq, Nk)
    p = softmax(logits)
    out = (p.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
    return out, p[:, :, 0].mean(dim=1)


def gelu(x, approximate):
    x = f64(x)
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def mlp(x, w1, b1, w2, b2, approximate):
    return linear(gelu(linear(x, w1, b1), approximate), w2, b2)


def cls_scores(x, norm_weight, norm_bias, qkv_weight, qkv_bias, num_heads, eps, scale, q_norm=None, k_norm=None):
    """Project every key explicitly: ``mean_h softmax_n(q_cls · k_n · scale)``."""
    B, N, D = x.shape
    Dh = D // num_heads
    qkv = linear(layer_norm(x, norm_weight, norm_bias, eps), qkv_weight, qkv_bias)  # (B, N, 3D)
    q = qkv[..., :D].reshape(B, N, num_heads, Dh).transpose(1, 2)
    k = qkv[..., D:2 * D].reshape(B, N, num_heads, Dh).transpose(1, 2)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    logits = (q[:, :, :1] * k).sum(-1) * scale  # (B, H, N)
    return softmax(logits).mean(dim=1)


def fuse_tokens(x, scores, keep, num_prefix):
    """Prefix, the ``keep`` tokens :func:`select_tokens` keeps, then ``Σ scores[j] · x[j]`` over the others."""
    x, s = f64(x), f64(scores)
    B, N, D = x.shape
    idx = select_tokens(scores, keep, num_prefix)
    out = torch.zeros(B, num_prefix + keep + 1, D, dtype=torch.float64)
    for b in range(B):
        kept = idx[b].tolist()
        for j, n in enumerate(kept):
            out[b, j] = x[b, n]
        for n in range(num_prefix, N):
            if n not in kept:
                out[b, -1] += s[b, n] * x[b, n]
    return out


def fuse_tokens_grad(grad_out, scores, keep, num_prefix):
    """Gradient of ``Σ fuse_tokens(x) · grad_out`` with respect to ``x``: a kept token's own output gradient,
    ``scores[j] · grad_out[fused]`` for a dropped token ``j``."""
    g, s = f64(grad_out), f64(scores)
    B, N = s.shape
    idx = select_tokens(scores, keep, num_prefix)
    grad = torch.empty(B, N, g.shape[2], dtype=torch.float64)
    for b in range(B):
        kept = idx[b].tolist()
        for n in range(N):
            grad[b, n] = g[b, kept.index(n)] if n in kept else s[b, n] * g[b, -1]
    return grad


def token_fuse_vit(vit, images, fuse_layers, keep_rate, adapters=None, links=(1, 3)):
    """Logits of a timm ViT with the token fuse and, given ``adapters``, Sparse-Tuning's Dense Adapters,
    written from the methods' definitions (docs/methods/sparse-tuning.md).

    Attention is computed explicitly and its class-token row read off the probabilities; the fuse is
    :func:`fuse_tokens` above; norms, MLPs and LayerScale are timm's own modules. Every adapter output is
    kept and fused along with the tokens; adapter ``l`` reads the outputs ``k`` blocks back for the ``k``
    in ``links`` with ``k <= l``, through ``link_down`` in that order.
    """
    P = vit.num_prefix_tokens
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    outputs = []  # every adapter's output so far, in the current token layout
    for layer, blk in enumerate(vit.blocks):
        attn = blk.attn
        B, N, D = x.shape
        qkv = attn.qkv(blk.norm1(x)).reshape(B, N, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
        p = softmax((q @ k.transpose(-1, -2)) * attn.scale)  # (B, H, N, N)
        x = x + blk.ls1(attn.proj((p @ v).transpose(1, 2).reshape(B, N, D)))
        if layer in fuse_layers:
            keep = math.ceil(keep_rate * (N - P))
            if keep < N - P:
                scores = p[:, :, 0].mean(dim=1)
                x = fuse_tokens(x, scores, keep, P).to(x.dtype)
                outputs = [fuse_tokens(t, scores, keep, P).to(t.dtype) for t in outputs]
        out = x + blk.ls2(blk.mlp(blk.norm2(x)))
        if adapters is not None:
            a = adapters[layer]
            z = x @ a.down.weight.T + a.down.bias
            back_links = [k for k in links if k <= layer]
            assert len(a.link_down) == len(back_links), f"adapter {layer}: {len(a.link_down)} dense links"
            for proj, back in zip(a.link_down, back_links):
                z = z + outputs[layer - back] @ proj.weight.T
            outputs.append(torch.relu(z) @ a.up.weight.T + a.up.bias)
            out = out + outputs[-1]
        x = out
    return vit.forward_head(vit.norm(x))
