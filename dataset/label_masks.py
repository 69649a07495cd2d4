"""Voxel masks of a label map on its own grid (`dataset.edit_labels`): connectivity structures, bounding boxes,
integer voxel boxes, a lesion mask from voxel coordinates (refused when empty or leaving the volume) and the host
class around a component.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from utils.errors import UserError

CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}  # neighbours -> scipy structuring-element rank


def connectivity_structure(connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])


def box_grid(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """All integer voxel coordinates in [start, stop] (inclusive, may leave the volume), shape (N, 3)."""
    axes = [np.arange(a, b + 1, dtype=np.int64) for a, b in zip(start, stop)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def mask_from_coords(coords: np.ndarray, shape: tuple[int, ...], class_index: int, what: str,
                     source: str) -> np.ndarray:
    if len(coords) == 0:
        raise UserError(f"{source}: the {what} lesion of class {class_index} would be empty (smaller than a voxel)")
    outside = np.any((coords < 0) | (coords >= np.asarray(shape)), axis=1)
    if outside.any():
        raise UserError(f"{source}: the {what} lesion of class {class_index} would leave the volume "
                        f"({int(outside.sum())} of {len(coords)} voxels outside shape {'x'.join(map(str, shape))})")
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(coords.T)] = True
    return mask


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + 1 + margin))
    return tuple(box)


def host_class(labels: np.ndarray, mask: np.ndarray, class_index: int, connectivity: int, source: str) -> int:
    """The most common label (other than `class_index`) in the one-voxel shell around `mask`."""
    box = bounding_box(mask, margin=1)
    local = mask[box]
    shell = ndimage.binary_dilation(local, structure=connectivity_structure(connectivity)) & ~local
    around = labels[box][shell]
    around = around[around != class_index]
    if around.size == 0:
        raise UserError(f"{source}: class {class_index} has no neighbouring class to fill with; set fill_class")
    values, counts = np.unique(around, return_counts=True)
    return int(values[np.argmax(counts)])
