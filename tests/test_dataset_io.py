import gzip

import nibabel as nib
import numpy as np
import pytest

from dataset.io import load_nifti, read_header, save_nifti
from dataset.phantoms import phantom_affine
from utils.errors import UserError


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_save_load_round_trip_keeps_values_affine_and_integer_type(tmp_path, suffix):
    affine = phantom_affine((0.7, 1.1, 3.0), "LPS", (12.0, -5.0, 30.0))
    image = np.random.default_rng(0).normal(size=(9, 7, 5)).astype(np.float32)
    label = np.arange(9 * 7 * 5).reshape(9, 7, 5) % 4
    save_nifti(image, affine, tmp_path / f"image{suffix}")
    save_nifti(label, affine, tmp_path / f"label{suffix}")
    loaded, loaded_affine = load_nifti(tmp_path / f"image{suffix}")
    loaded_label, _ = load_nifti(tmp_path / f"label{suffix}")
    np.testing.assert_array_equal(loaded, image)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-6)
    assert np.issubdtype(loaded_label.dtype, np.integer) and loaded_label.dtype == np.uint8
    np.testing.assert_array_equal(loaded_label, label)
    assert read_header(tmp_path / f"label{suffix}")[0] == (9, 7, 5)


def test_saved_header_carries_geometry_only(tmp_path):
    source = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    source.header["descrip"] = b"patient John Doe"
    source.header["db_name"] = b"hospital"
    data, affine = np.asarray(source.dataobj), source.affine
    save_nifti(data, affine, tmp_path / "out.nii.gz")
    header = nib.load(tmp_path / "out.nii.gz").header
    assert header["descrip"].item() == b"" and header["db_name"].item() == b""
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
    assert header.get_xyzt_units()[0] == "mm"


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "x.nii.gz"
    save_nifti(np.zeros((3, 3, 3), np.float32), np.eye(4), path)
    with pytest.raises(UserError, match="already exists"):
        save_nifti(np.ones((3, 3, 3), np.float32), np.eye(4), path)
    save_nifti(np.ones((3, 3, 3), np.float32), np.eye(4), path, overwrite=True)
    assert load_nifti(path)[0].max() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]  # no temporary left behind


def test_four_d_file_with_one_volume_is_3d(tmp_path):
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(5, 4, 3, 1), np.eye(4)), tmp_path / "a.nii")
    data, _ = load_nifti(tmp_path / "a.nii")
    assert data.shape == (5, 4, 3)


def _good_bytes(tmp_path, suffix):
    path = tmp_path / f"good{suffix}"
    save_nifti(np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32), np.eye(4), path)
    return path.read_bytes()


@pytest.mark.parametrize("name, make, message", [
    ("missing.nii.gz", None, "file not found"),
    ("empty.nii.gz", lambda tmp: b"", "empty file"),
    ("cut.nii.gz", lambda tmp: _good_bytes(tmp, ".nii.gz")[:-4000], "truncated or corrupt"),
    ("cut.nii", lambda tmp: _good_bytes(tmp, ".nii")[:5000], "truncated or corrupt"),
    ("text.nii.gz", lambda tmp: b"not an image at all" * 20, "not a readable NIfTI"),
    ("zipped_text.nii.gz", lambda tmp: gzip.compress(b"hello" * 100), "not a readable NIfTI"),
    ("image.txt", lambda tmp: b"123", "not a NIfTI file"),
])
def test_broken_files_give_one_line_user_errors(tmp_path, name, make, message):
    path = tmp_path / name
    if make is not None:
        path.write_bytes(make(tmp_path))
    with pytest.raises(UserError) as err:
        load_nifti(path)
    text = str(err.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


@pytest.mark.parametrize("shape, message", [((6, 6), "2D"), ((6, 6, 1), "2D"), ((6, 6, 6, 2), "more than one")])
def test_not_3d_files_are_rejected(tmp_path, shape, message):
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    with pytest.raises(UserError, match=message):
        load_nifti(path)
