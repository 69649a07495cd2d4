"""Reading and writing NIfTI volumes.

`load_nifti` turns every way a file can be broken into a one-line `UserError` naming the file; `save_nifti`
writes a fresh header that carries geometry only (no description, no patient metadata), atomically.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from utils.atomic import atomic_path
from utils.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_name(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _open(path: Path):
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    if not is_nifti_name(path):
        raise UserError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(str(path), mmap=False)
    except (ImageFileError, gzip.BadGzipFile, zlib.error) as err:
        raise UserError(f"{path}: not a readable NIfTI file ({_short(err)})") from None
    except (EOFError, OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable or truncated NIfTI header ({_short(err)})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UserError(f"{path}: not a NIfTI file (nibabel read it as {type(image).__name__})")
    return image


def _short(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes beyond the third (a 4D file holding one volume is fine)."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    shape = "x".join(str(s) for s in data.shape)
    if data.ndim > 3:
        raise UserError(f"{path}: {data.ndim}D image of shape {shape} holds more than one volume; expected 3D")
    if data.ndim < 3 or min(data.shape) < 2:
        raise UserError(f"{path}: image of shape {shape} is 2D (or a single slice); expected a 3D volume")
    return data


def read_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from the header only (cheap); raises `UserError` like `load_nifti`."""
    path = Path(path)
    image = _open(path)
    return tuple(int(s) for s in image.shape), image.affine.copy()


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Return `(array, affine)` of a 3D NIfTI file.

    Integer data without intensity scaling keeps its integer type; everything else is float32.
    """
    path = Path(path)
    image = _open(path)
    try:
        slope, inter = image.dataobj.slope, image.dataobj.inter
        raw_dtype = image.get_data_dtype()
        if np.issubdtype(raw_dtype, np.integer) and slope in (None, 1) and inter in (None, 0):
            data = np.asarray(image.dataobj)
        else:
            data = np.asarray(image.dataobj, dtype=np.float32)
    except (EOFError, OSError, ValueError, zlib.error) as err:
        raise UserError(f"{path}: truncated or corrupt image data ({_short(err)})") from None
    affine = image.affine.copy()
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError(f"{path}: invalid affine in the header (singular or not finite)")
    return _as_3d(data, path), affine


def smallest_label_dtype(array: np.ndarray) -> np.dtype:
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    overwrite: bool = False,
    dtype: np.dtype | str | None = None,
) -> Path:
    """Write `array` with `affine` to `path` (.nii or .nii.gz) atomically, with a geometry-only header.

    Without `dtype`: integer arrays use the smallest integer type that holds them, floats become float32.
    """
    path = Path(path)
    if not is_nifti_name(path):
        raise UserError(f"{path}: output must end in .nii or .nii.gz")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"save_nifti expects a 3D array, got shape {array.shape}")
    if dtype is None:
        dtype = smallest_label_dtype(array) if np.issubdtype(array.dtype, np.integer) or array.dtype == bool \
            else np.dtype(np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    header = image.header
    header.set_data_dtype(dtype)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header.set_xyzt_units(xyz="mm")
    header["descrip"] = b""
    header["aux_file"] = b""
    header["db_name"] = b""
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(image, str(tmp))
    return path
