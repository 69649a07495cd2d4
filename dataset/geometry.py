"""Putting volumes on the model grid and back.

The model grid of a volume is its own voxel grid reoriented to RAS (an exact permutation/flip of axes chosen by
nibabel from the affine) and resampled to the configured spacing along those same axes. Oblique volumes stay
oblique: the direction cosines are kept and only the voxel size changes, so no data is lost at the corners and
resampling is a per-axis scaling. `GridInfo` remembers the original grid so `from_model_grid` returns an array
with exactly the input's shape, to be saved with exactly the input's affine.
"""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel import orientations

RAS = orientations.axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class GridInfo:
    """Original grid (`original_affine`, `original_shape`) and the model grid (`model_affine`, `model_shape`)."""

    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    model_affine: np.ndarray
    model_shape: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {
            "original_affine": np.asarray(self.original_affine, dtype=float).tolist(),
            "original_shape": [int(s) for s in self.original_shape],
            "model_affine": np.asarray(self.model_affine, dtype=float).tolist(),
            "model_shape": [int(s) for s in self.model_shape],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "GridInfo":
        return cls(
            original_affine=np.asarray(data["original_affine"], dtype=np.float64),
            original_shape=tuple(int(s) for s in data["original_shape"]),
            model_affine=np.asarray(data["model_affine"], dtype=np.float64),
            model_shape=tuple(int(s) for s in data["model_shape"]),
        )

    @property
    def model_spacing(self) -> np.ndarray:
        return voxel_spacing(self.model_affine)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def orientation_codes(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def is_oblique(affine: np.ndarray, tolerance: float = 1e-4) -> bool:
    direction = np.asarray(affine)[:3, :3] / voxel_spacing(affine)
    return bool(np.any((np.abs(direction) > tolerance) & (np.abs(direction) < 1 - tolerance)))


def _to_ras_transform(affine: np.ndarray) -> np.ndarray:
    return orientations.ornt_transform(orientations.io_orientation(affine), RAS)


def _ras_grid(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Orientation transform, affine and shape of the original grid reoriented to RAS."""
    transform = _to_ras_transform(affine)
    ras_affine = affine @ orientations.inv_ornt_aff(transform, shape)
    ras_shape = tuple(int(shape[int(axis)]) for axis in np.argsort(transform[:, 0]))
    return transform, ras_affine, ras_shape


def _scaling(ras_spacing: np.ndarray, ras_shape: tuple[int, ...], target_spacing: np.ndarray):
    """Per-axis zoom (old voxels per new voxel), offset and new shape; grids share their centre."""
    zoom = target_spacing / ras_spacing
    zoom = np.where(np.abs(zoom - 1.0) < 1e-6, 1.0, zoom)
    n_old = np.asarray(ras_shape, dtype=np.float64)
    n_new = np.maximum(1, np.round(n_old / zoom)).astype(int)
    offset = (n_old - 1) / 2 - (n_new - 1) / 2 * zoom
    offset = np.where(np.abs(offset) < 1e-9, 0.0, offset)
    return zoom, offset, tuple(int(n) for n in n_new)


def _resample(array: np.ndarray, zoom: np.ndarray, offset: np.ndarray, shape: tuple[int, ...], is_label: bool):
    """Sample `array` at old-voxel positions `zoom * j + offset` for every new voxel j."""
    from scipy import ndimage  # imported here: checking a data set needs no resampling (faster CLI start)

    if np.all(zoom == 1.0) and np.all(offset == 0.0) and tuple(array.shape) == tuple(shape):
        return array.copy()
    if is_label:
        return ndimage.affine_transform(array, zoom, offset=offset, output_shape=shape, order=0, mode="nearest")
    source = array.astype(np.float32, copy=False)
    sigma = np.maximum(0.0, (zoom - 1.0) / 2.0)  # anti-aliasing before down-sampling
    if np.any(sigma > 0):
        source = ndimage.gaussian_filter(source, sigma=sigma, mode="nearest")
    return ndimage.affine_transform(source, zoom, offset=offset, output_shape=shape, order=1, mode="nearest")


def to_model_grid(array: np.ndarray, affine: np.ndarray, spacing, is_label: bool) -> tuple[np.ndarray, GridInfo]:
    """Reorient `array` to RAS and resample it to `spacing` (mm, X/Y/Z); labels by nearest neighbour.

    Returns the model-grid array (float32 for images, the input's integer type for labels) and its `GridInfo`.
    """
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"to_model_grid expects a 3D array, got shape {array.shape}")
    target = np.asarray(spacing, dtype=np.float64).reshape(3)
    transform, ras_affine, ras_shape = _ras_grid(affine, array.shape)
    ras_array = orientations.apply_orientation(array, transform)
    zoom, offset, model_shape = _scaling(voxel_spacing(ras_affine), ras_shape, target)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(zoom)
    scale[:3, 3] = offset
    model_affine = ras_affine @ scale
    resampled = _resample(np.ascontiguousarray(ras_array), zoom, offset, model_shape, is_label)
    if not is_label:
        resampled = resampled.astype(np.float32, copy=False)
    info = GridInfo(
        original_affine=affine.copy(),
        original_shape=tuple(int(s) for s in array.shape),
        model_affine=model_affine,
        model_shape=model_shape,
    )
    return np.ascontiguousarray(resampled), info


def from_model_grid(array: np.ndarray, grid_info: GridInfo, is_label: bool) -> np.ndarray:
    """Put a model-grid array back onto the original grid: the result has `grid_info.original_shape` and
    belongs with `grid_info.original_affine`."""
    array = np.asarray(array)
    if tuple(array.shape) != tuple(grid_info.model_shape):
        raise ValueError(f"array of shape {array.shape} is not on the model grid {tuple(grid_info.model_shape)}")
    transform, ras_affine, ras_shape = _ras_grid(grid_info.original_affine, grid_info.original_shape)
    zoom = np.diag(np.linalg.solve(ras_affine, grid_info.model_affine)[:3, :3])
    offset = np.linalg.solve(ras_affine, grid_info.model_affine)[:3, 3]
    zoom = np.where(np.abs(zoom - 1.0) < 1e-6, 1.0, zoom)
    offset = np.where(np.abs(offset) < 1e-9, 0.0, offset)
    # original-RAS voxel i sits at model voxel (i - offset) / zoom
    back = _resample(array, 1.0 / zoom, -offset / zoom, ras_shape, is_label)
    inverse = orientations.ornt_transform(RAS, orientations.io_orientation(grid_info.original_affine))
    restored = orientations.apply_orientation(back, inverse)
    assert restored.shape == tuple(grid_info.original_shape), (restored.shape, grid_info.original_shape)
    return np.ascontiguousarray(restored)


def model_grid_shape(affine: np.ndarray, shape, spacing) -> tuple[int, int, int]:
    """Shape `to_model_grid` would give, from the header alone."""
    _, ras_affine, ras_shape = _ras_grid(np.asarray(affine, dtype=np.float64), tuple(shape))
    return _scaling(voxel_spacing(ras_affine), ras_shape, np.asarray(spacing, dtype=np.float64).reshape(3))[2]
