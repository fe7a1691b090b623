"""Fake (meta) kernels of ``torch.ops.alast``: output shapes and dtypes only, so the ops trace under
``torch.compile`` / FakeTensorMode and run on ``meta`` tensors."""
import torch


@torch.library.register_fake("alast::select_tokens")
def _select_tokens(scores, keep, num_prefix):
    torch._check(scores.dim() == 2, lambda: f"alast::select_tokens: scores must be 2-D, got {scores.dim()}-D")
    return scores.new_empty((scores.shape[0], num_prefix + keep), dtype=torch.int64)


@torch.library.register_fake("alast::gather_tokens")
def _gather_tokens(x, idx):
    torch._check(x.dim() == 3 and idx.dim() == 2, lambda: "alast::gather_tokens: x must be 3-D and idx 2-D")
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.register_fake("alast::gather_tokens_backward")
def _gather_tokens_backward(grad_out, idx, num_tokens):
    torch._check(grad_out.dim() == 3, lambda: "alast::gather_tokens_backward: grad_out must be 3-D")
    return grad_out.new_empty((grad_out.shape[0], num_tokens, grad_out.shape[2]))


@torch.library.register_fake("alast::scatter_tokens")
def _scatter_tokens(x, idx, delta):
    torch._check(x.dim() == 3, lambda: "alast::scatter_tokens: x must be 3-D")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("alast::cls_scores")
def _cls_scores(x, u, eps):
    torch._check(x.dim() == 3, lambda: "alast::cls_scores: x must be 3-D")
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float32)
