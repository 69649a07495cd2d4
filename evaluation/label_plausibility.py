"""Plausibility measures of one integer label map (numpy arrays, RAS order), for `evaluation.labelmaps`:
components per class (26-connectivity), holes (cavities, 6-connected), the class adjacency matrix of face-neighbour
voxel pairs and the classes hosting a lesion (each lesion voxel's nearest non-lesion voxel).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from dataset.attributes import components

HOLE_STRUCTURE = ndimage.generate_binary_structure(3, 1)  # cavities: 6-connectivity (dual of 26 for the class)
HOST_MARGIN = 3  # voxels around a lesion's bounding box searched for its nearest non-lesion voxel


def count_holes(mask: np.ndarray) -> int:
    """Cavities of a class: 6-connected components of the other voxels enclosed by it (not reaching the outside
    of its bounding box; the box is padded by one voxel so the outside is one connected shell)."""
    hits = np.nonzero(mask)
    if not hits[0].size:
        return 0
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in hits)
    inside = ~np.pad(mask[box], 1)
    labelled, count = ndimage.label(inside, structure=HOLE_STRUCTURE)
    outside = labelled[0, 0, 0]
    return int(count - (outside > 0))


def component_sizes(mask: np.ndarray) -> np.ndarray:
    labelled, count = components(mask)
    return np.bincount(labelled.ravel(), minlength=count + 1)[1:]


def adjacency_counts(label: np.ndarray, label_nc: int) -> np.ndarray:
    """Symmetric (label_nc, label_nc) counts of face-neighbour voxel pairs of two different classes."""
    counts = np.zeros(label_nc * label_nc, np.int64)
    for axis in range(label.ndim):
        a = np.take(label, np.arange(label.shape[axis] - 1), axis=axis)
        b = np.take(label, np.arange(1, label.shape[axis]), axis=axis)
        differ = a != b
        counts += np.bincount(a[differ] * label_nc + b[differ], minlength=label_nc * label_nc)
    matrix = counts.reshape(label_nc, label_nc)
    return matrix + matrix.T


def adjacency_fractions(counts: np.ndarray) -> np.ndarray:
    """Counts -> shares of all different-class face pairs (each unordered pair's share in both [a, b] and [b, a],
    so the upper triangle sums to 1)."""
    total = np.triu(counts, 1).sum()
    return counts / total if total else counts.astype(np.float64)


def adjacency_l1(a: np.ndarray, b: np.ndarray) -> float:
    upper = np.triu_indices(a.shape[0], 1)
    return float(np.abs(a[upper] - b[upper]).sum())


def host_counts(label: np.ndarray, lesion: int, spacing, label_nc: int) -> np.ndarray:
    """Voxels of class `lesion` per host class (the class of each lesion voxel's nearest non-lesion voxel)."""
    mask = label == lesion
    hits = np.nonzero(mask)
    if not hits[0].size:
        return np.zeros(label_nc, np.int64)
    box = tuple(slice(max(0, int(a.min()) - HOST_MARGIN), int(a.max()) + 1 + HOST_MARGIN) for a in hits)
    crop, inside = label[box], mask[box]
    if inside.all():  # the lesion fills the volume: nothing hosts it
        return np.zeros(label_nc, np.int64)
    indices = ndimage.distance_transform_edt(inside, sampling=spacing, return_distances=False, return_indices=True)
    hosts = crop[tuple(index[inside] for index in indices)]
    return np.bincount(hosts, minlength=label_nc)
