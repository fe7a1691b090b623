"""A frozen backbone's per-image features, computed once and reused (for the frozen-backbone methods).

When the backbone never trains and the training images are not augmented, what the backbone computes for
an image is the same every epoch. :class:`FeatureCache` keeps it, so epochs after the first run only the
trainable path. It is exact or it refuses:

* **Images are named by ids from the data pipeline** (an int per image, e.g. its index in the data set),
  ``0 <= id < num_images``.
* **Every image is also fingerprinted by its content**, and a cached id is only reused for the very same
  pixels: two 64-bit sums of the image's bytes weighted by fixed random integers, in exact integer
  arithmetic (no rounding, no overflow for images up to 16 MiB; two different images collide with a
  probability below 2⁻⁶⁰). An id seen again with other pixels — augmented data, ids reused across data
  sets, a shuffled id mapping — raises instead of returning another image's features.
* **Features keep the dtype they were computed in**; features of another dtype (autocast switched on
  after the cache was made) raise instead of being converted.
* **The size is known up front**: the whole store is allocated when the cache is made, and a cache over
  the memory limit given is refused with the sizes in the message.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch

from ._validate import check_int, is_int, is_real

__all__ = ["FeatureCache", "format_bytes", "image_fingerprints"]

# Two fingerprints per image; coefficients below 2**31 times bytes below 2**8 summed over at most 2**24
# bytes stay below 2**63: the integer sums are exact and independent of summation order.
_FINGERPRINTS = 2
_COEFF_BITS = 31
_MAX_IMAGE_BYTES = 1 << 24
_CHUNK_ELEMENTS = 1 << 23  # int64 temporaries of at most 64 MiB while fingerprinting
_coefficients: Dict[Tuple[int, str], torch.Tensor] = {}


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _coefficients_for(nbytes: int, device: torch.device) -> torch.Tensor:
    key = (nbytes, str(device))
    if key not in _coefficients:
        gen = torch.Generator().manual_seed(0x5EED)  # fixed: fingerprints must not change between calls
        coeffs = torch.randint(0, 1 << _COEFF_BITS, (_FINGERPRINTS, nbytes), generator=gen, dtype=torch.int64)
        _coefficients[key] = coeffs.to(device)
    return _coefficients[key]


def image_fingerprints(images: torch.Tensor) -> torch.Tensor:
    """int64 ``(B, 2)`` content fingerprints of ``images`` ``(B, ...)``, any dtype: equal iff (with
    probability ≥ 1 − 2⁻⁶⁰) the images have the same bytes."""
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise ValueError(f"images: expected a (B, ...) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    B = images.shape[0]
    raw = images.detach().contiguous().reshape(B, -1)
    raw = raw.view(torch.uint8) if raw.dtype != torch.bool else raw.to(torch.uint8)
    nbytes = raw.shape[1]
    if nbytes > _MAX_IMAGE_BYTES:
        raise ValueError(f"images: the feature cache fingerprints images of at most "
                         f"{format_bytes(_MAX_IMAGE_BYTES)}, got {format_bytes(nbytes)} per image")
    coeffs = _coefficients_for(nbytes, raw.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, nbytes))
    out = torch.empty(B, _FINGERPRINTS, dtype=torch.int64, device=raw.device)
    for start in range(0, B, rows):
        chunk = raw[start:start + rows].to(torch.int64)
        for f in range(_FINGERPRINTS):
            out[start:start + rows, f] = (chunk * coeffs[f]).sum(dim=1)
    return out


class FeatureCache:
    """Per-image features of shape ``feature_shape``, for ``num_images`` images named by ids.

    Args:
        num_images: how many distinct images (ids ``0 .. num_images-1``).
        feature_shape: the shape of one image's features, e.g. ``(L, N, D)``.
        dtype, device: of the stored features (the backbone's output dtype; any device — the CPU keeps
            GPU memory free at the price of a copy per batch).
        max_bytes: the memory the cache may take; a cache that needs more is refused (``ValueError``
            naming ``max_bytes`` with both sizes).
        what: a name for the features in messages.

    :meth:`fetch` is the one entry point: cached rows are read, the others computed and stored.
    ``hits`` and ``misses`` count images served from the cache and computed.
    """

    def __init__(self, num_images: int, feature_shape: Sequence[int], dtype: torch.dtype,
                 device, max_bytes: int, what: str = "features"):
        num_images = check_int("num_images", num_images, 1)
        # Any number of bytes, infinity included (no limit): an int stays an int.
        if not is_real(max_bytes) or not max_bytes >= 0:
            raise ValueError(f"max_bytes: expected a number of bytes >= 0, got {max_bytes!r}")
        max_bytes = int(max_bytes) if is_int(max_bytes) else float(max_bytes)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.num_images, self.dtype, self.device, self.what = num_images, dtype, torch.device(device), what
        self.nbytes = self.bytes_needed(num_images, self.feature_shape, dtype)
        self.max_bytes = max_bytes
        if self.nbytes > max_bytes:
            raise ValueError(
                f"max_bytes: a feature cache of {what} for {num_images} images needs {format_bytes(self.nbytes)} "
                f"({format_bytes(self.bytes_per_image(self.feature_shape, dtype))} per image: "
                f"{' x '.join(map(str, self.feature_shape))} {str(dtype).replace('torch.', '')}), over the limit "
                f"of {format_bytes(max_bytes)}; raise max_bytes, cache fewer images, or train without the cache")
        self._store = torch.empty((num_images, *self.feature_shape), dtype=dtype, device=self.device)
        self._fingerprints = torch.zeros(num_images, _FINGERPRINTS, dtype=torch.int64, device=self.device)
        self._filled = torch.zeros(num_images, dtype=torch.bool, device=self.device)
        self.hits = self.misses = 0

    @staticmethod
    def bytes_per_image(feature_shape: Sequence[int], dtype: torch.dtype) -> int:
        """Features, fingerprints and the filled flag of one image."""
        features = math.prod(feature_shape) * dtype.itemsize
        return features + _FINGERPRINTS * 8 + 1

    @classmethod
    def bytes_needed(cls, num_images: int, feature_shape: Sequence[int], dtype: torch.dtype) -> int:
        """What a cache of ``num_images`` images takes, in bytes (allocated in full when it is made)."""
        return num_images * cls.bytes_per_image(feature_shape, dtype)

    @property
    def filled(self) -> int:
        """How many images are cached."""
        return int(self._filled.sum())

    def clear(self) -> None:
        """Forget every cached image (the memory stays allocated)."""
        self._filled.zero_()
        self.hits = self.misses = 0

    def _check_ids(self, ids, batch: int) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            raise TypeError(f"ids: expected an integer tensor of image ids, "
                            f"got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.shape != (batch,):
            raise ValueError(f"ids: expected shape ({batch},), one id per image, got {tuple(ids.shape)}")
        ids = ids.to(device=self.device, dtype=torch.int64)
        if batch:
            lo, hi = (int(t) for t in torch.aminmax(ids))
            if lo < 0 or hi >= self.num_images:
                raise IndexError(f"ids: expected ids in [0, {self.num_images}) (num_images of the cache), got "
                                 f"values from {lo} to {hi}")
        return ids

    def fetch(self, ids: torch.Tensor, images: torch.Tensor,
              compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The features of ``images`` ``(B, ...)`` named ``ids`` (integer ``(B,)``): ``(B, *feature_shape)``
        on the images' device.

        Cached images are read; the others are computed by ``compute(images[miss])``, which must return
        ``(M, *feature_shape)`` in the cache's dtype, and stored. Raises ``ValueError`` naming ``ids`` when
        an id comes with other pixels than it was cached with (or than another row with the same id).
        """
        ids = self._check_ids(ids, images.shape[0])
        prints = image_fingerprints(images).to(self.device)
        filled = self._filled[ids]
        changed = filled & (self._fingerprints[ids] != prints).any(dim=1)
        if bool(changed.any()):
            bad = int(ids[changed][0])
            raise ValueError(f"ids: image id {bad} was cached with other pixels; the feature cache needs training "
                             f"data without augmentation and one id per distinct image")
        order = ids.argsort()
        same_id = ids[order][1:] == ids[order][:-1]
        if bool((same_id & (prints[order][1:] != prints[order][:-1]).any(dim=1)).any()):
            bad = int(ids[order][1:][same_id][0])
            raise ValueError(f"ids: image id {bad} appears twice in the batch with different pixels")
        miss = (~filled).nonzero().squeeze(1)
        if miss.numel():
            computed = compute(images[miss.to(images.device)])
            expected = (miss.numel(), *self.feature_shape)
            if tuple(computed.shape) != expected or computed.dtype != self.dtype:
                raise ValueError(f"dtype: the backbone produced {self.what} of shape {tuple(computed.shape)} and "
                                 f"dtype {computed.dtype}; the cache holds {expected} {self.dtype} (was autocast "
                                 f"switched on or off after the cache was made?)")
            where = ids[miss]
            self._store[where] = computed.to(self.device)
            self._fingerprints[where] = prints[miss]
            self._filled[where] = True
        self.misses += miss.numel()
        self.hits += ids.numel() - miss.numel()
        return self._store[ids].to(images.device, non_blocking=True)

    def __repr__(self) -> str:
        return (f"FeatureCache({self.what}: {self.num_images} images x "
                f"{format_bytes(self.bytes_per_image(self.feature_shape, self.dtype))} = {format_bytes(self.nbytes)} "
                f"of max_bytes {format_bytes(self.max_bytes)}, {str(self.dtype).replace('torch.', '')} on "
                f"{self.device}; {self.filled} cached, {self.hits} hits, {self.misses} misses)")
