"""Checks on one image/label pair, shared by `dataset.validate` and the preprocessing cache.

Every problem is a one-line `UserError` naming the file; the statistics of a good pair come back as `CaseStats`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dataset.geometry import is_oblique, orientation_codes, voxel_spacing
from dataset.io import load_nifti, smallest_label_dtype
from dataset.layout import Case
from utils.errors import UserError

AFFINE_TOLERANCE = 1e-3  # mm (and direction-cosine units): image and label affines may differ by rounding only


@dataclass
class CaseStats:
    case_id: str
    patient_id: str
    shape: list[int]
    spacing: list[float]
    orientation: str
    oblique: bool
    intensity_min: float
    intensity_max: float
    label_counts: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CaseStats":
        return cls(**data)


def _shape_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_image(path, image: np.ndarray) -> None:
    if np.issubdtype(image.dtype, np.floating):
        finite = np.isfinite(image)
        if not finite.all():
            kind = "NaN" if np.isnan(image).any() else "Inf"
            raise UserError(f"{path}: image has {int((~finite).sum())} {kind}/non-finite voxels")
    if image.min() == image.max():
        raise UserError(f"{path}: image is constant (every voxel is {float(image.min()):g})")


def check_label(path, label: np.ndarray, label_nc: int) -> None:
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise UserError(f"{path}: label map has NaN or Inf voxels")
        fractional = label != np.round(label)
        if fractional.any():
            example = float(label[fractional].flat[0])
            raise UserError(f"{path}: label map has fractional values (e.g. {example:g}); labels must be integers")
    low, high = label.min(), label.max()
    if low < 0:
        raise UserError(f"{path}: label map has negative values (min {low:g})")
    if high >= label_nc:
        raise UserError(f"{path}: label value {high:g} >= dataset.label_nc={label_nc} "
                        f"(labels must be 0..{label_nc - 1}; set dataset.label_nc)")


def check_pair_geometry(case: Case, image_shape, image_affine, label_shape, label_affine) -> None:
    if tuple(image_shape) != tuple(label_shape):
        raise UserError(f"{case.label_path}: label shape {_shape_text(label_shape)} differs from image shape "
                        f"{_shape_text(image_shape)} ({case.image_path.name})")
    difference = float(np.abs(np.asarray(image_affine) - np.asarray(label_affine)).max())
    if difference > AFFINE_TOLERANCE:
        raise UserError(f"{case.label_path}: label affine differs from the image affine of {case.image_path.name} "
                        f"(max difference {difference:.3g})")


def check_case_arrays(case: Case, image, image_affine, label, label_affine, label_nc: int) -> CaseStats:
    """All pair checks on loaded arrays; returns the pair's statistics."""
    check_image(case.image_path, image)
    check_label(case.label_path, label, label_nc)
    check_pair_geometry(case, image.shape, image_affine, label.shape, label_affine)
    counts = np.bincount(label.ravel().astype(np.intp, copy=False), minlength=label_nc)
    return CaseStats(
        case_id=case.case_id,
        patient_id=case.patient_id,
        shape=[int(s) for s in image.shape],
        spacing=[float(s) for s in voxel_spacing(image_affine)],
        orientation=orientation_codes(image_affine),
        oblique=is_oblique(image_affine),
        intensity_min=float(image.min()),
        intensity_max=float(image.max()),
        label_counts=[int(c) for c in counts],
    )


def load_checked_case(case: Case, label_nc: int):
    """Load and check a pair: `(image, label, affine, stats)`, the label in the smallest integer type."""
    image, image_affine = load_nifti(case.image_path)
    label, label_affine = load_nifti(case.label_path)
    stats = check_case_arrays(case, image, image_affine, label, label_affine, label_nc)
    return image, label.astype(smallest_label_dtype(label), copy=False), image_affine, stats
