"""Loading volumes for evaluation: RAS-canonical orientation (so slice axes have anatomical names) and the
mapping of intensities to [-1, 1] for the 2D networks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from nibabel import orientations

from dataset.io import load_nifti
from utils.errors import UserError

AXIS_NAMES = ("sagittal", "coronal", "axial")  # slices along X, Y, Z of a RAS-oriented volume


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact axis permutation/flip to RAS (no resampling) and the matching affine."""
    current = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt("RAS"))
    new_affine = affine @ orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(orientations.apply_orientation(array, transform)), new_affine


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(float32 RAS array, affine)."""
    array, affine = load_nifti(path)
    array, affine = to_canonical(array, affine)
    return array.astype(np.float32, copy=False), affine


def load_label(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    array, affine = load_nifti(path)
    array, _ = to_canonical(array, affine)
    if np.issubdtype(array.dtype, np.floating):
        if not np.allclose(array, np.round(array)):
            raise UserError(f"{path}: label map holds non-integer values")
        array = np.round(array)
    if array.shape != tuple(shape):
        raise UserError(f"{path}: label map shape {array.shape} differs from its image {tuple(shape)}")
    return array.astype(np.int64)


def to_unit_range(volume: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Map [low, high] linearly to [-1, 1] and clip; `None` means the volume already is in [-1, 1]."""
    if window is None:
        return np.clip(volume, -1.0, 1.0).astype(np.float32)
    low, high = window
    return np.clip(2.0 * (volume - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)


def robust_window(paths, lower: float = 0.5, upper: float = 99.5) -> tuple[float, float]:
    """Median over volumes of their `lower` and `upper` percentiles: one window for real and synthetic alike."""
    bounds = np.array([np.percentile(load_volume(p)[0], [lower, upper]) for p in paths])
    low, high = (float(v) for v in np.median(bounds, axis=0))
    return (low, high) if high > low else (low, low + 1.0)
