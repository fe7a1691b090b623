"""numpy integer and float scalars are accepted wherever Python numbers are (methods' options, ops'
arguments) and give what the Python numbers give; bools of either kind stay refused."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from alast_kernels import methods, ops
from alast_kernels.feature_cache import FeatureCache

pytestmark = pytest.mark.usefixtures("reference_backend")


def tiny():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)


# Options of each method as Python numbers; the test passes each number as a numpy scalar of another width.
OPTIONS = {
    "lora": {"rank": 4, "alpha": 6.0, "dropout": 0.25},
    "alast+lora": {"rank": 4, "lora_alpha": 6.0},
    "sparse_tuning": {"keep_rate": 0.5, "fuse_layers": [1, 2], "adapter_dim": 8, "dense_links": (1, 2)},
    "evit": {"keep_rate": 0.5, "fuse_layers": (1, 3), "schedule_steps": 10, "warmup_steps": 2},
    "losa": {"rank": 3, "token_rank": 2},
    "synqt": {"num_queries": 2, "hidden": 5, "rank": 3},
}
_INTS = (np.int64, np.int32, np.uint8)
_FLOATS = (np.float32, np.float64)


def _as_numpy(value, i=0):
    if isinstance(value, (list, tuple)):
        return type(value)(_as_numpy(v, i + j) for j, v in enumerate(value))
    if isinstance(value, int):
        return _INTS[i % len(_INTS)](value)
    return _FLOATS[i % len(_FLOATS)](value)


def _loss_after_a_step(method):
    method.model.train()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)
    torch.manual_seed(11)  # dropout draws the same masks
    with method.step():
        loss = F.cross_entropy(method.model(x), y)
        loss.backward()
    return loss.item()


@pytest.mark.parametrize("name", list(OPTIONS))
def test_method_options_as_numpy_scalars_build_the_same_method(name):
    python = OPTIONS[name]
    numpy = {k: _as_numpy(v, i) for i, (k, v) in enumerate(python.items())}
    torch.manual_seed(100)
    want = methods.create(name, tiny(), **python)
    torch.manual_seed(100)
    got = methods.create(name, tiny(), **numpy)
    assert _loss_after_a_step(got) == _loss_after_a_step(want)
    # The method's own settings (the ALaST controller's state is the controller's, tested with it).
    mine = {k: v for k, v in got.state_dict().items() if k != "controller"}
    assert mine == {k: v for k, v in want.state_dict().items() if k != "controller"}
    json.dumps(mine)  # plain Python numbers, not numpy's


@pytest.mark.parametrize("name, option, value", [
    ("lora", "rank", np.bool_(True)), ("lora", "rank", True), ("losa", "rank", np.float64(3.0)),
    ("evit", "schedule_steps", np.float32(2.5)), ("sparse_tuning", "fuse_layers", [np.bool_(True)]),
    ("sparse_tuning", "keep_rate", np.bool_(True)), ("lora", "dropout", np.float32(1.0)),
    ("lora", "alpha", np.float64("nan")),
])
def test_bools_and_wrong_kinds_stay_refused(name, option, value):
    with pytest.raises(ValueError, match=option):
        methods.create(name, tiny(), **{option: value})


def test_ops_take_numpy_scalars():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 9, generator=g)
    assert torch.equal(ops.select_tokens(scores, np.int64(3), np.int32(1)), ops.select_tokens(scores, 3, 1))
    x = torch.randn(2, 9, 6, generator=g)
    assert torch.equal(ops.fuse_tokens(x, scores, np.int16(4), num_prefix=np.int64(2)),
                       ops.fuse_tokens(x, scores, 4, num_prefix=2))
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    assert torch.equal(ops.attention(q, k, v, scale=np.float32(0.5)),
                       ops.attention(q, k, v, scale=float(np.float32(0.5))))
    assert torch.equal(ops.query_attention(q[:, :, :2], k, v, scale=np.float64(0.25)),
                       ops.query_attention(q[:, :, :2], k, v, scale=0.25))
    w = torch.randn(18, 6, generator=g)
    assert torch.equal(ops.cls_scores(x, None, None, w, None, np.int64(2)), ops.cls_scores(x, None, None, w, None, 2))
    for bad in (np.bool_(True), True, np.float64(3.0)):
        with pytest.raises(ValueError, match="keep"):
            ops.select_tokens(scores, bad)
    for bad in (np.bool_(True), True, np.float64(2.0)):
        with pytest.raises(ValueError, match="num_heads"):
            ops.cls_scores(x, None, None, w, None, bad)
    with pytest.raises(ValueError, match="scale"):
        ops.attention(q, k, v, scale=np.bool_(True))


def test_feature_cache_sizes_take_numpy_scalars():
    cache = FeatureCache(np.int64(3), (2, 4), torch.float32, "cpu", max_bytes=np.float64(1e6))
    assert cache.num_images == 3 and type(cache.num_images) is int and type(cache.max_bytes) is float
    with pytest.raises(ValueError, match="num_images"):
        FeatureCache(np.bool_(True), (2, 4), torch.float32, "cpu", max_bytes=1e6)
