"""Synthetic NIfTI data sets for tests: spheres of random classes (MONAI `create_test_image_3d`), each class with
its own intensity (HU-like for CT, arbitrary units for MR) plus noise, on any grid (anisotropic, any axis
orientation, oblique), in either folder layout.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nibabel import orientations

from dataset.io import save_nifti

CT_BACKGROUND_HU, CT_CLASS_RANGE_HU, CT_NOISE_HU = -900.0, (-300.0, 900.0), 15.0
MR_BACKGROUND, MR_CLASS_RANGE, MR_NOISE = 20.0, (200.0, 1000.0), 8.0


def class_intensity(label_nc: int, modality: str) -> np.ndarray:
    """Mean intensity of each class (index 0 = background)."""
    background, (low, high) = (CT_BACKGROUND_HU, CT_CLASS_RANGE_HU) if modality == "ct" \
        else (MR_BACKGROUND, MR_CLASS_RANGE)
    return np.concatenate([[background], np.linspace(low, high, max(1, label_nc - 1))])


def phantom_affine(spacing: Sequence[float] = (1.0, 1.0, 1.0), orientation: str = "RAS",
                   rotation_deg: Sequence[float] = (0.0, 0.0, 0.0), origin: Sequence[float] | None = None
                   ) -> np.ndarray:
    """Affine with voxel `spacing`, axis codes `orientation` (e.g. "LPS", "PIR") and an extra rotation of
    `rotation_deg` about the world x, y, z axes (oblique when not multiples of 90)."""
    ornt = orientations.axcodes2ornt(tuple(orientation))
    axes = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        axes[int(world_axis), voxel_axis] = flip * float(spacing[voxel_axis])
    rx, ry, rz = np.deg2rad(np.asarray(rotation_deg, dtype=np.float64))
    rot_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    rot_y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    rot_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot_z @ rot_y @ rot_x @ axes
    affine[:3, 3] = origin if origin is not None else [-40.0, 25.0, -12.5]
    return affine


def phantom_volume(shape: Sequence[int], label_nc: int, modality: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, label): spheres of classes 1..label_nc-1 on background 0, class intensities plus noise.
    CT images are int16 HU, MR images float32."""
    from monai.data.synthetic import create_test_image_3d

    rng = np.random.RandomState(seed)
    shape = [int(s) for s in shape]
    rad_max = max(2, min(shape) // 4)
    _, label = create_test_image_3d(*shape, num_objs=max(4, label_nc), rad_max=rad_max, rad_min=1,
                                    num_seg_classes=label_nc - 1, random_state=rng)
    if not (label > 0).any():  # guarantee some foreground
        label[tuple(s // 2 for s in shape)] = 1
    means = class_intensity(label_nc, modality)
    noise = CT_NOISE_HU if modality == "ct" else MR_NOISE
    image = means[label] + rng.normal(0.0, noise, size=label.shape)
    if modality == "ct":
        return np.round(image).astype(np.int16), label.astype(np.uint8 if label_nc <= 256 else np.int16)
    return np.maximum(image, 0).astype(np.float32), label.astype(np.uint8 if label_nc <= 256 else np.int16)


def layout_paths(root: Path, layout: str, case_id: str, suffix: str = ".nii.gz", channel: int = 0):
    """(image path, label path) of `case_id` in `layout`."""
    if layout == "nnunet":
        return root / "imagesTr" / f"{case_id}_{channel:04d}{suffix}", root / "labelsTr" / f"{case_id}{suffix}"
    return root / "images" / f"{case_id}{suffix}", root / "labels" / f"{case_id}{suffix}"


def write_phantom_dataset(
    root: str | os.PathLike,
    *,
    layout: str = "images_labels",
    case_ids: Sequence[str] | None = None,
    n_cases: int = 4,
    shape: Sequence[int] = (32, 32, 16),
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
    orientation: str = "RAS",
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
    label_nc: int = 3,
    modality: str = "ct",
    n_channels: int = 1,
    suffix: str = ".nii.gz",
    seed: int = 0,
) -> list[str]:
    """Write a phantom data set into `root` and return its case ids (default `case000`, `case001`, ...).

    With `layout="nnunet"` and `n_channels > 1`, channels `_0001`... hold a second, differently scaled image."""
    root = Path(root)
    case_ids = list(case_ids) if case_ids is not None else [f"case{i:03d}" for i in range(n_cases)]
    affine = phantom_affine(spacing, orientation, rotation_deg)
    for index, case_id in enumerate(case_ids):
        image, label = phantom_volume(shape, label_nc, modality, seed * 100003 + index)
        image_path, label_path = layout_paths(root, layout, case_id, suffix)
        save_nifti(image, affine, image_path)
        save_nifti(label, affine, label_path)
        for channel in range(1, n_channels if layout == "nnunet" else 1):
            extra = np.abs(image.astype(np.float32) * 0.01 * (channel + 1))
            save_nifti(extra, affine, layout_paths(root, layout, case_id, suffix, channel)[0])
    return case_ids
