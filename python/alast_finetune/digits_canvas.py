"""The embedded data set of the fine-tuning job: scikit-learn's bundled handwritten digits on a canvas.

Each 8×8 digit (``sklearn.datasets.load_digits``, 1797 images, no download) is upscaled and pasted at a
random position on a larger canvas of faint noise, so most patches of a ViT's input are background —
the case that token selection is for. With the defaults (48×48 canvas, digits upscaled 3× to 24×24,
patch size 8) a digit covers 9 to 16 of the 36 patches.

Two tasks share the images: *pretraining* on digits 0–4 and *fine-tuning* on digits 5–9 (labels
5–9 become 0–4). Splits, positions and noise come from seeded generators, so every run sees the same
data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

__all__ = ["load_digits", "DigitCanvas", "TensorImages", "digit_tasks", "batches"]

NOISE_STD = 0.1  # background texture, so background patches are not all identical


def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits: float32 images ``(1797, 8, 8)`` in [0, 1] and their int64
    labels 0–9 (``(1797,)``), in scikit-learn's order."""
    from sklearn import datasets

    data = datasets.load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    return images, torch.as_tensor(data.target, dtype=torch.int64)


@dataclass
class DigitCanvas:
    """Digits rendered on demand at random positions of a ``canvas``×``canvas`` 3-channel image.

    digits: float32 ``(M, 8, 8)`` in [0, 1]; labels: int64 ``(M,)``. ``render`` returns float32
    ``(len(idx), 3, canvas, canvas)`` normalised to about [-1, 1].
    """
    digits: torch.Tensor
    labels: torch.Tensor
    canvas: int
    scale: int
    num_classes: int
    grid: int = 1

    def __post_init__(self):
        if self.canvas < 8 * self.scale:
            raise ValueError(f"canvas: expected at least 8·scale = {8 * self.scale} pixels, got {self.canvas}")
        # Upscaled once: bilinear keeps the strokes smooth at 3×.
        self.glyphs = F.interpolate(self.digits[:, None], scale_factor=self.scale, mode="bilinear",
                                    align_corners=False).clamp_(0, 1)[:, 0]

    def __len__(self) -> int:
        return len(self.labels)

    def render(self, idx: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of samples ``idx``, each digit at a position drawn from ``generator``."""
        n, size, c = len(idx), self.glyphs.shape[-1], self.canvas
        out = (torch.randn(n, c, c, generator=generator) * NOISE_STD).abs_()
        corners = torch.randint(0, (c - size) // self.grid + 1, (n, 2), generator=generator) * self.grid
        for i, (top, left) in enumerate(corners.tolist()):
            patch = out[i, top:top + size, left:left + size]
            torch.maximum(patch, self.glyphs[idx[i]], out=patch)
        images = (out.clamp_(0, 1) - 0.5) / 0.5
        return images[:, None].expand(n, 3, c, c).contiguous(), self.labels[idx]

    def fixed(self, seed: int, views: int = 1) -> "TensorImages":
        """Every sample rendered ``views`` times at seeded positions: a held-out set that never changes
        (several views of each digit measure accuracy with less noise from where the digits happen to sit)."""
        g = torch.Generator().manual_seed(seed)
        parts = [self.render(torch.arange(len(self)), g) for _ in range(views)]
        return TensorImages(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), self.num_classes)


@dataclass
class TensorImages:
    """Images already rendered: float32 ``(M, C, H, W)`` and int64 labels ``(M,)``."""
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def render(self, idx: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


def _split(labels: torch.Tensor, test_fraction: float, generator: torch.Generator):
    """Stratified split: per class, a seeded ``test_fraction`` of the samples goes to the test side."""
    train, test = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def digit_tasks(canvas: int = 48, seed: int = 0, test_fraction: float = 0.25, grid: int = 1, test_views: int = 4):
    """The two tasks on a ``canvas``×``canvas`` image: ``{"pretrain": (train, test), "finetune": (train, test)}``.

    Training sides are :class:`DigitCanvas` (a new position for every draw, a free augmentation); test
    sides are :class:`TensorImages`, each held-out digit rendered ``test_views`` times at seeded positions.
    Pretraining uses digits 0–4, fine-tuning digits 5–9 relabelled 0–4; each is split 75/25 per class.
    """
    digits, labels = load_digits()
    scale = max(1, canvas // 16)  # digit covers half the canvas side: at most a quarter of the patches
    g = torch.Generator().manual_seed(seed)
    tasks = {}
    for name, classes in (("pretrain", range(0, 5)), ("finetune", range(5, 10))):
        members = ((labels >= classes.start) & (labels < classes.stop)).nonzero()[:, 0]
        sub_digits, sub_labels = digits[members], labels[members] - classes.start
        train_idx, test_idx = _split(sub_labels, test_fraction, g)
        train = DigitCanvas(sub_digits[train_idx], sub_labels[train_idx], canvas, scale, len(classes), grid)
        test = DigitCanvas(sub_digits[test_idx], sub_labels[test_idx], canvas, scale, len(classes), grid)
        tasks[name] = (train, test.fixed(seed + 1 + classes.start, test_views))
    return tasks


def batches(source, batch_size: int, steps: int, seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` training batches: seeded epochs of shuffled samples, rendered by ``source.render``.

    The same ``seed`` gives the same batches in the same order, so two runs see identical data.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(source), generator=g)])
        idx, order = order[:batch_size], order[batch_size:]
        yield source.render(idx, g)
