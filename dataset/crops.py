"""Cropping and padding on the model grid (numpy arrays, axes X, Y, Z).

Training crops are random, optionally centred on a voxel of a rare (lesion) class or on any foreground voxel;
validation crops are centred. Volumes
smaller than the crop are padded symmetrically (images with -1, the normalised minimum; labels with 0).
`pad_to_multiple`/`unpad` let a whole volume pass through a network that down-samples by a fixed factor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

IMAGE_PAD_VALUE = -1.0
LABEL_PAD_VALUE = 0

Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _pad(array: np.ndarray, pads: Pads, value) -> np.ndarray:
    if not any(before or after for before, after in pads):
        return array
    return np.pad(array, pads, mode="constant", constant_values=value)


def pad_to_at_least(array: np.ndarray, shape: Sequence[int], value) -> tuple[np.ndarray, Pads]:
    """Pad symmetrically so every axis is at least `shape`."""
    pads = tuple((max(0, s - n) // 2, max(0, s - n) - max(0, s - n) // 2) for n, s in zip(array.shape, shape))
    return _pad(array, pads, value), pads


def pad_to_multiple(array: np.ndarray, multiple: int | Sequence[int], value) -> tuple[np.ndarray, Pads]:
    """Pad at the end of each axis up to a multiple of `multiple`."""
    multiples = [multiple] * 3 if isinstance(multiple, int) else list(multiple)
    pads = tuple((0, (-n) % m) for n, m in zip(array.shape, multiples))
    return _pad(array, pads, value), pads


def unpad(array, pads: Pads):
    """Undo `pad_to_at_least` or `pad_to_multiple` on the last three axes (numpy array or tensor)."""
    index = tuple(slice(before, array.shape[-3 + i] - after) for i, (before, after) in enumerate(pads))
    return array[(..., *index)]


def crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    return array[tuple(slice(int(b), int(b) + int(s)) for b, s in zip(start, size))]


def center_start(shape: Sequence[int], size: Sequence[int]) -> list[int]:
    return [(n - s) // 2 for n, s in zip(shape, size)]


def random_start(shape: Sequence[int], size: Sequence[int], generator: torch.Generator | None = None,
                 centre: Sequence[int] | None = None) -> list[int]:
    """Start corner of a crop: uniform over valid positions, or the crop around `centre` (clamped inside)."""
    if centre is None:
        return [int(torch.randint(0, n - s + 1, (1,), generator=generator)) for n, s in zip(shape, size)]
    return [int(min(max(c - s // 2, 0), n - s)) for n, s, c in zip(shape, size, centre)]


def draw_centre(foreground: np.ndarray, class_locations: Mapping[int, np.ndarray], *, foreground_prob: float,
                class_prob: float = 0.0, classes: Sequence[int] = (),
                generator: torch.Generator | None = None) -> np.ndarray | None:
    """Where a training crop is centred (a voxel of the unpadded volume), or None for a uniform crop: with
    probability `class_prob`, a voxel of one of `classes` (drawn uniformly among those the case holds; the rare
    lesion classes, as nnU-Net oversamples its foreground classes); otherwise, with probability
    `foreground_prob`, any foreground voxel."""
    held = [c for c in classes if len(class_locations.get(c, ()))]
    if held and float(torch.rand((), generator=generator)) < class_prob:
        voxels = class_locations[held[int(torch.randint(0, len(held), (1,), generator=generator))]]
        return voxels[int(torch.randint(0, len(voxels), (1,), generator=generator))]
    if len(foreground) and float(torch.rand((), generator=generator)) < foreground_prob:
        return foreground[int(torch.randint(0, len(foreground), (1,), generator=generator))]
    return None


def sample_crop(image: np.ndarray, label: np.ndarray, size: Sequence[int], *, centre: np.ndarray | None = None,
                generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training crop of `size` around `centre` (a voxel of the unpadded volume; `draw_centre`), or uniform."""
    image, pads = pad_to_at_least(image, size, IMAGE_PAD_VALUE)
    label, _ = pad_to_at_least(label, size, LABEL_PAD_VALUE)
    if centre is not None:
        centre = [int(v) + before for v, (before, _) in zip(centre, pads)]
    start = random_start(image.shape, size, generator, centre)
    return crop(image, start, size), crop(label, start, size)


def center_crop(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    image, _ = pad_to_at_least(image, size, IMAGE_PAD_VALUE)
    label, _ = pad_to_at_least(label, size, LABEL_PAD_VALUE)
    start = center_start(image.shape, size)
    return crop(image, start, size), crop(label, start, size)
