"""``alast_kernels.measure``: what it counts, and that measuring leaves nothing alive."""
import gc
import weakref

import torch

from alast_kernels.measure import saved_activation_bytes


def test_saved_bytes_count_each_storage_once_and_skip_parameters():
    w = torch.randn(8, 6, requires_grad=True)
    x = torch.randn(5, 6)

    def forward():
        h = x @ w.t()          # saves x (5*6 float32) and w (a parameter: not counted)
        return torch.exp(h)    # saves its own output (5*8 float32)

    assert saved_activation_bytes(forward, [w]) == 5 * 6 * 4 + 5 * 8 * 4


def test_the_measured_graph_is_freed_without_the_garbage_collector():
    """A node that saves its own output (``exp``) must not keep the graph alive through the hook."""
    w = torch.randn(64, 64, requires_grad=True)
    refs = []

    def forward():
        out = torch.exp(torch.randn(32, 64) @ w)
        refs.append(weakref.ref(out))
        return out.sum()

    gc.collect()
    gc.disable()
    try:
        assert saved_activation_bytes(forward, [w]) > 0
        assert refs[0]() is None, "the measured activations outlived the call (a reference cycle)"
    finally:
        gc.enable()


def test_a_measured_forward_can_still_be_backpropagated():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 3)
    kept = []
    saved_activation_bytes(lambda: kept.append(torch.exp(x @ w.t()).sum()) or kept[-1], [w])
    kept[0].backward()
    want = (torch.exp(x @ w.t())[..., None] * x[:, None, :]).sum(0)
    assert torch.allclose(w.grad, want)
