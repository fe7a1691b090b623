"""The feature cache: fingerprints, size estimate and refusal, hits and misses, every way it refuses
instead of answering wrongly, and the same losses with the cache as without for both methods."""
import copy

import pytest
import torch
import torch.nn.functional as F

from alast_kernels.feature_cache import FeatureCache, format_bytes, image_fingerprints
from frozen_testing import METHODS, create, images, perturb_trainable, tiny_vit


def test_fingerprints_tell_images_apart_exactly():
    x = images(4)
    prints = image_fingerprints(x)
    assert prints.shape == (4, 2) and prints.dtype == torch.int64
    assert torch.equal(image_fingerprints(x.clone()), prints)  # same bytes, same prints
    assert torch.equal(image_fingerprints(x[2:]), prints[2:])  # independent of the batch around an image
    assert len({tuple(p) for p in prints.tolist()}) == 4
    nudged = x.clone()
    nudged[1, 2, 31, 31] = torch.nextafter(nudged[1, 2, 31, 31], torch.tensor(1e9))  # one ulp, one pixel
    changed = image_fingerprints(nudged)
    assert torch.equal(changed[[0, 2, 3]], prints[[0, 2, 3]]) and (changed[1] != prints[1]).all()
    assert not torch.equal(image_fingerprints(x.flip(-1)), prints)  # a flip: the augmentation it must catch
    assert image_fingerprints(x.half()).shape == (4, 2) and image_fingerprints(x.to(torch.uint8)).shape == (4, 2)


def _linear_features(x):
    """A stand-in backbone: features (B, 2, 3) from the images, deterministic."""
    return x.flatten(1)[:, :6].reshape(-1, 2, 3) * 2.0


def test_size_estimate_and_refusal():
    per_image = 2 * 3 * 4 + 2 * 8 + 1  # float32 features, two int64 fingerprints, the filled flag
    assert FeatureCache.bytes_per_image((2, 3), torch.float32) == per_image
    assert FeatureCache.bytes_needed(10, (2, 3), torch.float32) == 10 * per_image
    cache = FeatureCache(10, (2, 3), torch.float32, "cpu", max_bytes=10 * per_image)
    assert cache.nbytes == 10 * per_image and cache.filled == 0
    with pytest.raises(ValueError, match=r"^max_bytes: .* 11 images needs 451 B \(41 B per image: 2 x 3 "
                                         r"float32\), over the limit of 410 B"):
        FeatureCache(11, (2, 3), torch.float32, "cpu", max_bytes=10 * per_image)
    assert format_bytes(3 * 2**20) == "3.0 MiB"


def test_hits_misses_and_exact_values():
    cache = FeatureCache(6, (2, 3), torch.float32, "cpu", max_bytes=1 << 20)
    x = images(6, size=4)
    calls = []

    def compute(batch):
        calls.append(batch.shape[0])
        return _linear_features(batch)

    first = cache.fetch(torch.tensor([0, 1, 2]), x[:3], compute)
    torch.testing.assert_close(first, _linear_features(x[:3]), rtol=0, atol=0)
    mixed = cache.fetch(torch.tensor([4, 2, 0, 5]), x[[4, 2, 0, 5]], compute)
    assert calls == [3, 2]  # only images 4 and 5 were computed the second time
    torch.testing.assert_close(mixed, _linear_features(x[[4, 2, 0, 5]]), rtol=0, atol=0)
    assert (cache.hits, cache.misses, cache.filled) == (2, 5, 5)
    again = cache.fetch(torch.tensor([5, 5]), x[[5, 5]], compute)  # a repeated id with the same pixels
    torch.testing.assert_close(again, _linear_features(x[[5, 5]]), rtol=0, atol=0)
    assert calls == [3, 2]
    cache.clear()
    assert cache.filled == 0
    cache.fetch(torch.tensor([5]), x[[5]], compute)
    assert calls == [3, 2, 1]


def test_refuses_rather_than_answer_wrongly():
    cache = FeatureCache(4, (2, 3), torch.float32, "cpu", max_bytes=1 << 20)
    x = images(4, size=4)
    cache.fetch(torch.arange(4), x, _linear_features)
    with pytest.raises(ValueError, match="^ids: image id 0 was cached with other pixels"):
        cache.fetch(torch.tensor([0, 1]), x[[0, 1]].flip(-1), _linear_features)  # augmented
    with pytest.raises(ValueError, match="^ids: image id 2 was cached with other pixels"):
        cache.fetch(torch.tensor([2]), x[[3]], _linear_features)  # ids shuffled
    fresh = FeatureCache(4, (2, 3), torch.float32, "cpu", max_bytes=1 << 20)
    with pytest.raises(ValueError, match="^ids: image id 1 appears twice in the batch with different pixels"):
        fresh.fetch(torch.tensor([1, 1]), x[[0, 1]], _linear_features)
    with pytest.raises(IndexError, match=r"^ids: expected ids in \[0, 4\)"):
        fresh.fetch(torch.tensor([0, 4]), x[:2], _linear_features)
    with pytest.raises(ValueError, match=r"^ids: expected shape \(2,\)"):
        fresh.fetch(torch.tensor([0, 1, 2]), x[:2], _linear_features)
    with pytest.raises(TypeError, match="^ids:"):
        fresh.fetch(torch.tensor([0.0, 1.0]), x[:2], _linear_features)
    with pytest.raises(ValueError, match="^dtype: .*dtype torch.bfloat16"):
        fresh.fetch(torch.tensor([0]), x[:1], lambda b: _linear_features(b).bfloat16())
    assert fresh.filled == 0  # nothing half-stored by the refused calls
    for bad, error in [({"num_images": 0}, ValueError), ({"max_bytes": -1}, ValueError),
                       ({"dtype": torch.int64}, TypeError)]:
        args = {"num_images": 4, "feature_shape": (2, 3), "dtype": torch.float32, "device": "cpu",
                "max_bytes": 1 << 20, **bad}
        with pytest.raises(error, match=f"^{next(iter(bad))}:"):
            FeatureCache(**args)


@pytest.mark.parametrize("name", METHODS)
def test_method_cache_size_and_refusal(name):
    method = create(name, tiny_vit(reg_tokens=2))
    L, N, D, H = 3, 19, 192, 3
    per_image_features = L * N * D * 4 * (1 if name == "losa" else 2)  # losa: block outputs; synqt: k and v
    assert method.feature_cache_bytes(100) == 100 * (per_image_features + 17)
    with pytest.raises(ValueError, match=r"^max_bytes: a feature cache of .* for 100 images needs"):
        method.enable_feature_cache(100, max_bytes=method.feature_cache_bytes(100) - 1)
    cache = method.enable_feature_cache(100, max_bytes=method.feature_cache_bytes(100))
    assert method.model.feature_cache is cache and cache.feature_shape[0] == L
    assert cache.feature_shape == ((L, N, D) if name == "losa" else (L, 2, H, N, D // H))
    method.disable_feature_cache()
    assert method.model.feature_cache is None


@pytest.mark.parametrize("name", METHODS)
def test_same_losses_with_and_without_cache(name):
    """Two epochs of AdamW over shuffled batches, with and without the cache: the same losses and weights;
    the second epoch served entirely from the cache."""
    torch.manual_seed(0)
    method = create(name, tiny_vit(reg_tokens=2))
    perturb_trainable(method)
    cached = copy.deepcopy(method)
    cache = cached.enable_feature_cache(12, max_bytes=1 << 24)
    data, labels = images(12), torch.arange(12) % 5
    runs = []
    for m, use_ids in ((method, False), (cached, True)):
        opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(3)
        losses = []
        for _epoch in range(2):
            for ids in torch.randperm(12, generator=gen).split(4):
                with m.step():
                    loss = F.cross_entropy(m.model(data[ids], ids=ids if use_ids else None), labels[ids])
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
        runs.append(torch.stack(losses))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(cached.trainable_parameters(), method.trainable_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (cache.misses, cache.hits, cache.filled) == (12, 12, 12)
    # Evaluation never reads the cache: validation images may reuse training ids.
    cached.model.eval()
    other = images(2, seed=9)
    torch.testing.assert_close(cached.model(other, ids=torch.tensor([0, 1])), cached.model(other), rtol=0, atol=0)
    assert cache.hits == 12
