"""Every bad input gives one line naming the file or folder, in-process (`UserError`) and through the CLI
(exit code 2, one stderr line, no traceback), and nothing is written into the data folder."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dataset.phantoms import phantom_affine, write_phantom_dataset
from dataset.validate import validate_dataset
from utils.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHAPE, SPACING = (12, 12, 8), (1.0, 1.0, 2.0)
AFFINE = phantom_affine(SPACING)


def _put(path: Path, array, affine=AFFINE, dtype=None):
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype or np.asarray(array).dtype), affine)
    nib.save(image, path)


def _image(root, case="case000"):
    return root / "images" / f"{case}.nii.gz"


def _label(root, case="case000"):
    return root / "labels" / f"{case}.nii.gz"


def _edit_label(root, change):
    label = np.asarray(nib.load(_label(root)).dataobj).astype(np.float32)
    _put(_label(root), change(label), dtype=np.float32)


def _edit_image(root, change):
    image = np.asarray(nib.load(_image(root)).dataobj).astype(np.float32)
    _put(_image(root), change(image), dtype=np.float32)


def _set(array, index, value):
    array[index] = value
    return array


# name -> (how to break a good data set, the path the message must name, words the message must hold)
BAD_CASES = {
    "root_missing": (lambda r: shutil.rmtree(r), lambda r: r, "does not exist"),
    "root_empty": (lambda r: [shutil.rmtree(r / d) for d in ("images", "labels")], lambda r: r, "is empty"),
    "images_folder_missing": (lambda r: shutil.rmtree(r / "images"), lambda r: r / "images", "folder missing"),
    "image_without_label": (lambda r: _label(r).unlink(), _image, "has no label map"),
    "label_without_image": (lambda r: _image(r).unlink(), _label, "has no image"),
    "zero_byte": (lambda r: _image(r).write_bytes(b""), _image, "empty file"),
    "truncated": (lambda r: _image(r).write_bytes(_image(r).read_bytes()[:-300]), _image, "truncated"),
    "non_nifti_content": (lambda r: _label(r).write_bytes(b"<html>not a volume</html>" * 10), _label,
                          "not a readable NIfTI"),
    "non_nifti_name": (lambda r: (r / "images" / "notes.txt").write_text("x"),
                       lambda r: r / "images" / "notes.txt", "not a NIfTI file"),
    "shape_mismatch": (lambda r: _put(_label(r), np.zeros((12, 12, 7), np.uint8)), _label, "differs from image shape"),
    "affine_mismatch": (lambda r: _put(_label(r), np.asarray(nib.load(_label(r)).dataobj),
                                       phantom_affine(SPACING, origin=(-40.0, 25.0, -10.0))), _label, "label affine"),
    "label_negative": (lambda r: _edit_label(r, lambda a: _set(a, (0, 0, 0), -1)), _label, "negative"),
    "label_fractional": (lambda r: _edit_label(r, lambda a: _set(a, (0, 0, 0), 0.5)), _label, "fractional"),
    "label_too_large": (lambda r: _edit_label(r, lambda a: _set(a, (0, 0, 0), 3)), _label, ">= dataset.label_nc=3"),
    "image_nan": (lambda r: _edit_image(r, lambda a: _set(a, (1, 2, 3), np.nan)), _image, "NaN"),
    "image_inf": (lambda r: _edit_image(r, lambda a: _set(a, (1, 2, 3), np.inf)), _image, "non-finite"),
    "image_2d": (lambda r: _put(_image(r), np.ones((12, 12), np.float32)), _image, "2D"),
    "image_4d": (lambda r: _put(_image(r), np.random.rand(12, 12, 8, 2).astype(np.float32)), _image,
                 "more than one volume"),
    "image_constant": (lambda r: _put(_image(r), np.full(SHAPE, 7, np.int16)), _image, "constant"),
}


def _snapshot(root: Path):
    if not root.exists():
        return None
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def broken_roots(tmp_path_factory):
    """One broken copy of a good 3-case phantom data set per bad case."""
    good = tmp_path_factory.mktemp("good")
    write_phantom_dataset(good, n_cases=3, shape=SHAPE, spacing=SPACING, label_nc=3, modality="ct")
    roots = {}
    for name, (break_it, _, _) in BAD_CASES.items():
        root = tmp_path_factory.mktemp(name) / "data"
        shutil.copytree(good, root)
        break_it(root)
        roots[name] = root
    return roots


def _cfg(compose_cfg, root):
    return compose_cfg("check", ["dataset=nifti", f"dataset.root_dir='{root}'", "dataset.label_nc=3"]).dataset


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_is_one_line_naming_the_file(name, broken_roots, compose_cfg):
    root = broken_roots[name]
    _, where, words = BAD_CASES[name]
    before = _snapshot(root)
    with pytest.raises(UserError) as err:
        validate_dataset(_cfg(compose_cfg, root))
    message = str(err.value)
    assert message.startswith(str(where(root))), message
    assert words in message and "\n" not in message
    assert _snapshot(root) == before


@pytest.fixture(scope="module")
def cli_results(broken_roots):
    """Run `python -m dataset.check` on every broken data set (concurrently, to keep the suite fast)."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    before = {name: _snapshot(root) for name, root in broken_roots.items()}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dataset.check", "dataset=nifti", f"dataset.root_dir='{root}'",
             "dataset.label_nc=3"], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        for name, root in broken_roots.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stdout, stderr, before[name] == _snapshot(broken_roots[name]))
    return results


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_cli_reports_bad_input_in_one_line_with_exit_code_2(name, cli_results, broken_roots):
    returncode, stdout, stderr, unchanged = cli_results[name]
    _, where, words = BAD_CASES[name]
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"error: {where(broken_roots[name])}") and words in lines[0]
    assert stdout == "" and unchanged


def test_valid_oddities_pass_oblique_anisotropic_and_single_volume_4d(tmp_path, compose_cfg):
    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=3, shape=SHAPE, spacing=(0.6, 0.9, 4.0), orientation="LIP",
                          rotation_deg=(15.0, 0.0, -25.0), label_nc=3, modality="ct")
    image = np.asarray(nib.load(_image(root)).dataobj)
    _put(_image(root), image[..., None], affine=nib.load(_image(root)).affine)
    summary = validate_dataset(_cfg(compose_cfg, root))
    assert len(summary.cases) == 3 and all(s.oblique for s in summary.stats)
    assert all(np.allclose(s.spacing, [0.6, 0.9, 4.0]) for s in summary.stats)
    assert summary.label_counts.sum() == 3 * np.prod(SHAPE)


def test_cli_prints_a_summary_and_exits_0(phantom_root):
    result = subprocess.run(
        [sys.executable, "-m", "dataset.check", "dataset=nifti", f"dataset.root_dir='{phantom_root}'",
         "dataset.label_nc=3", "dataset.modality=mr", "dataset/intensity=percentile", "dataset.spacing=[2,2,2]",
         "dataset.class_names=[background,ball,other]"],
        cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cases: 6 from 6 patients" in out and "image shape (voxels): 24x24x16" in out
    assert "spacing (mm): 1x1x2" in out and "orientation: RAS 6" in out
    assert "model grid at 2x2x2 mm: 12x12x16 voxels" in out
    assert "ball" in out and "split (seed 0): train 4 cases" in out and "val 1" in out and "test 1" in out


@pytest.mark.parametrize("override, message", [
    ("dataset.label_nc=1", "dataset.label_nc: need an integer >= 2"),
    ("dataset.class_names=[a,b]", "2 names given but dataset.label_nc is 3"),
    ("dataset.crop_size=[16,16,0]", "dataset.crop_size"),
    ("dataset.modality=pet", "dataset.modality"),
    ("dataset.augment.flip_axes=[3]", "flip_axes"),
    ("dataset.layout=bids", "unknown layout"),
])
def test_bad_config_values_are_user_errors(override, message, phantom_root, compose_cfg):
    cfg = compose_cfg("check", ["dataset=nifti", f"dataset.root_dir='{phantom_root}'", "dataset.label_nc=3",
                                override]).dataset
    with pytest.raises(UserError, match=message):
        validate_dataset(cfg)


def test_missing_root_dir_and_label_nc_tell_the_user_what_to_pass(compose_cfg):
    with pytest.raises(UserError, match="dataset.label_nc is not set"):
        validate_dataset(compose_cfg("check", ["dataset=nifti"]).dataset)
    with pytest.raises(UserError, match="dataset.root_dir is not set: pass dataset.root_dir=PATH"):
        validate_dataset(compose_cfg("check", ["dataset=duke"]).dataset)
