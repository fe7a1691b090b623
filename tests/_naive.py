"""Naive float64 re-derivations of the ALaST ops, written from docs/ops.md and docs/alast.md
with explicit loops and maths.

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


# --------------------------------------------------------------------------- frozen-backbone methods
# LoSA and SynQT re-derived in float64 from their descriptions (alast_kernels/methods/losa.py, synqt.py),
# reading the modules' parameters but none of their code. The backbone's own features come from timm's
# `forward_intermediates` (and forward pre-hooks for the block inputs), not from the methods' loops.

def _norm(module, x):
    """A timm LayerNorm (or Identity) by its parameters."""
    if isinstance(module, torch.nn.Identity):
        return f64(x)
    return layer_norm(x, module.weight, module.bias, module.eps)


def _linear(module, x):
    return linear(x, module.weight, module.bias)


def _layer_scale(module, x):
    return f64(x) if isinstance(module, torch.nn.Identity) else f64(x) * f64(module.gamma)


def _low_rank_mlp(module, x):
    """``up(gelu(down(x)))`` of a LowRankMLP-like module with ``down``/``up`` linears."""
    return _linear(module.up, gelu(_linear(module.down, x), "none"))


def vit_head(vit, tokens):
    """timm's final norm, pooling ('token' or 'avg'), fc_norm and classifier on ``(B, N, D)`` tokens."""
    t = _norm(vit.norm, tokens)
    if vit.global_pool == "token":
        pooled = t[:, 0]
    elif vit.global_pool == "avg":
        pooled = t[:, vit.num_prefix_tokens:].mean(dim=1)
    else:
        raise NotImplementedError(vit.global_pool)
    return _linear(vit.head, _norm(vit.fc_norm, pooled))


def block_outputs(vit, images):
    """Every block's output ``(B, N, D)`` (prefix tokens first), from timm's ``forward_intermediates``."""
    with torch.no_grad():
        outs = vit.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True,
                                         intermediates_only=True)
    return [f64(torch.cat([o[1], o[0]], dim=1)) if isinstance(o, tuple) else f64(o) for o in outs]


def block_inputs(vit, images):
    """Every block's input ``(B, N, D)``, captured by forward pre-hooks while timm runs the model."""
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(f64(args[0]))) for b in vit.blocks]
    try:
        with torch.no_grad():
            vit.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def losa_logits(model, images):
    """LoSA: ``a_0 = 0``, ``a_l = a_{l-1} + g_l(b_l + a_{l-1})``, logits from ``b_L + a_L``."""
    vit = model.backbone
    outputs = block_outputs(vit, images)
    a = torch.zeros_like(outputs[0])
    for b, g in zip(outputs, model.side):
        u = b + a
        t = _norm(g.token_norm, u).transpose(1, 2)
        token_update = _linear(g.token_up, gelu(_linear(g.token_down, t), "none")).transpose(1, 2)
        v = u + token_update
        channel_update = _linear(g.channel_up, gelu(_linear(g.channel_down, _norm(g.channel_norm, v)), "none"))
        a = a + token_update + channel_update
    return vit_head(vit, outputs[-1] + a)


def _near_identity(module, x):
    return x + linear(linear(x, module.a.weight, None), module.b.weight, None)


def _heads(x, num_heads):
    B, T, A = x.shape
    return x.reshape(B, T, num_heads, A // num_heads).transpose(1, 2)


def synqt_logits(model, images):
    """SynQT: per block, synthesise queries, read the block's keys/values with its frozen weights; head."""
    vit = model.backbone
    B = images.shape[0]
    previous, vectors = None, []
    for block, synthesis, x in zip(vit.blocks, model.synthesis, block_inputs(vit, images)):
        attn = block.attn
        H, A = attn.num_heads, attn.num_heads * attn.head_dim
        w, bias = attn.qkv.weight, attn.qkv.bias
        part = lambda i, w=w, bias=bias, A=A: (w[i * A:(i + 1) * A], None if bias is None else bias[i * A:(i + 1) * A])
        hx = _norm(block.norm1, x)
        k = _heads(linear(hx, *part(1)), H)
        v = _heads(linear(hx, *part(2)), H)
        if not isinstance(attn.k_norm, torch.nn.Identity):
            k = _norm(attn.k_norm, k)
        # query synthesis
        q_in = f64(synthesis.prompts).unsqueeze(0)
        if previous is not None:
            q_in = q_in + f64(synthesis.previous_scale) * previous.unsqueeze(1)
        q_in = q_in + _low_rank_mlp(synthesis.bottleneck, q_in)
        mixing = synthesis.mixing
        scores = _near_identity(mixing.q, q_in) @ _near_identity(mixing.k, q_in).transpose(1, 2)
        p = softmax(scores / math.sqrt(q_in.shape[-1]))
        q_in = q_in + f64(synthesis.mix[0]) * _near_identity(mixing.out, p @ _near_identity(mixing.v, q_in))
        queries = (q_in + f64(synthesis.mix[1]) * _low_rank_mlp(synthesis.adapter, q_in)).expand(B, -1, -1)
        # knowledge extraction through the frozen block
        q = _heads(linear(_norm(block.norm1, queries), *part(0)), H)
        if not isinstance(attn.q_norm, torch.nn.Identity):
            q = _norm(attn.q_norm, q)
        o = attention(q, k, v, attn.scale)[0].transpose(1, 2).reshape(B, -1, A)
        a = _layer_scale(block.ls1, _linear(attn.proj, _norm(attn.norm, o)))
        y = queries + a
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        m = _layer_scale(block.ls2, mlp(_norm(block.norm2, y), fc1.weight, fc1.bias, fc2.weight, fc2.bias, "none"))
        z = y + m
        previous = z.mean(dim=1)
        vectors += [a.mean(dim=1), m.mean(dim=1), previous]
    head = model.head
    r = _norm(head.norm, torch.stack([previous] + vectors, dim=1))
    r = r + _low_rank_mlp(head.adapter, r)
    weights = torch.cat([torch.ones(B, 1, dtype=torch.float64), torch.tanh(_linear(head.gate, r[:, 0]))], dim=1)
    return _linear(head.classifier, _norm(head.final_norm, (weights.unsqueeze(-1) * r).mean(dim=1)))


def paper_block(blk, x, budget):
    """One block of the authors' ALaST (Split-Learning_ADC ``methods/alast.py``) on ``(B, n, D)`` tokens, the
    class token first: the block on every token, then the class token and the ``int(budget · n)`` other
    tokens its own class-token attention row ranks highest. Returns (kept tokens, their indices into ``x``,
    ``Δ = Σ_batch Σ_width (c_out − c_in)²``)."""
    x = f64(x)
    B, n, D = x.shape
    attn = blk.attn
    H = attn.num_heads
    qkv = _linear(attn.qkv, _norm(blk.norm1, x))
    q, k, v = (_heads(qkv[..., i * D:(i + 1) * D], H) for i in range(3))
    o, cls_row = attention(q, k, v, attn.scale)
    y = x + _layer_scale(blk.ls1, _linear(attn.proj, o.transpose(1, 2).reshape(B, n, D)))
    h = _norm(blk.norm2, y)
    out = y + _layer_scale(blk.ls2, mlp(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight,
                                        blk.mlp.fc2.bias, "none"))
    delta = ((out[:, 0] - x[:, 0]) ** 2).sum()
    keep = min(int(budget * n), n - 1)
    idx = select_tokens(cls_row, keep, 1)
    kept = torch.stack([torch.stack([out[b, int(j)] for j in idx[b]]) for b in range(B)])
    return kept, idx, delta


def paper_vit(vit, images, budgets):
    """The authors' training forward of a class-token ViT: returns (logits, per block its output tokens, the
    original token indices they hold, Δ)."""
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))  # the embeddings are not what is re-derived here
    x = f64(x)
    B, N, _ = x.shape
    origin = torch.arange(N).expand(B, N)
    outputs, origins, deltas = [], [], []
    for blk, budget in zip(vit.blocks, budgets):
        x, idx, delta = paper_block(blk, x, budget)
        origin = torch.stack([origin[b, idx[b]] for b in range(B)])
        outputs.append(x), origins.append(origin), deltas.append(delta)
    return vit_head(vit, x), outputs, origins, deltas
