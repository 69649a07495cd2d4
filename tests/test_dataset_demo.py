import json

import matplotlib.image
import numpy as np
import pytest

from dataset.checks import validate_dataset
from dataset.demo import ensure_demo_dataset, subject_ids, write_preview
from dataset.demo import main as demo_main
from dataset.io import load_nifti
from utils.errors import UserError


def _subject(root, case_id):
    image, affine = load_nifti(root / "images" / f"{case_id}.nii.gz")
    label, label_affine = load_nifti(root / "labels" / f"{case_id}.nii.gz")
    assert np.array_equal(affine, label_affine)
    return image, label, affine


def test_demo_is_built_once_into_the_cache_with_the_expected_layout(demo_cfg, isolated_cache):
    root = ensure_demo_dataset(demo_cfg)
    assert root == isolated_cache / "medlsdm" / "demo"
    assert sorted(p.name for p in root.iterdir()) == ["demo.json", "images", "labels"]
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{c}.nii.gz" for c in subject_ids(6)]
    assert json.loads((root / "demo.json").read_text())["n_subjects"] == 6
    stamp = (root / "images" / "subject000.nii.gz").stat().st_mtime_ns
    assert ensure_demo_dataset(demo_cfg) == root  # reused, not rebuilt
    assert (root / "images" / "subject000.nii.gz").stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".demo")]  # no temporary folders left


def test_demo_subjects_have_every_class_and_a_distinct_lesion_intensity(demo_cfg):
    root = ensure_demo_dataset(demo_cfg)
    shapes = set()
    for case_id in subject_ids(6):
        image, label, affine = _subject(root, case_id)
        shapes.add(image.shape)
        np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [6.0, 6.0, 6.0])
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}, case_id
        median = [np.median(image[label == k]) for k in range(5)]
        assert median[0] < median[1] < median[2] < median[3] < median[4], (case_id, median)
        assert median[4] > np.percentile(image[label == 3], 95)  # lesions brighter than white matter
    assert shapes == {(33, 39, 32)}  # the 197x233x189 mm template field of view at 6 mm
    summary = validate_dataset(demo_cfg)
    assert len(summary.cases) == 6 and "lesion" in "\n".join(summary.lines())


def test_demo_subjects_differ_and_are_deterministic_by_seed(demo_cfg, edit_cfg, tmp_path):
    root = ensure_demo_dataset(demo_cfg)
    image_a, label_a, _ = _subject(root, "subject000")
    image_b, label_b, _ = _subject(root, "subject001")
    assert (label_a != label_b).mean() > 0.02 and not np.array_equal(image_a, image_b)
    again = ensure_demo_dataset(edit_cfg(demo_cfg, {"cache_dir": str(tmp_path / "a"), "demo.n_subjects": 2}))
    image_again, label_again, _ = _subject(again, "subject001")
    np.testing.assert_array_equal(image_again, image_b)
    np.testing.assert_array_equal(label_again, label_b)
    other = ensure_demo_dataset(edit_cfg(demo_cfg, {"cache_dir": str(tmp_path / "b"), "demo.n_subjects": 1,
                                                    "demo.seed": 1}))
    assert not np.array_equal(_subject(other, "subject000")[1], label_a)


def test_changed_settings_rebuild_in_place(demo_cfg, edit_cfg, tmp_path):
    cfg = edit_cfg(demo_cfg, {"cache_dir": str(tmp_path), "demo.n_subjects": 1})
    root = ensure_demo_dataset(cfg)
    root = ensure_demo_dataset(edit_cfg(cfg, {"demo.n_subjects": 2}))
    assert sorted(p.name for p in (root / "labels").iterdir()) == ["subject000.nii.gz", "subject001.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_default_spacing_gives_the_documented_grid(compose_cfg, tmp_path):
    cfg = compose_cfg("check", ["dataset=demo", "dataset.demo.n_subjects=1", f"dataset.cache_dir={tmp_path}"])
    image, label, affine = _subject(ensure_demo_dataset(cfg.dataset), "subject000")
    assert image.shape == (66, 78, 63)
    np.testing.assert_allclose(np.diag(affine)[:3], [3.0, 3.0, 3.0])


def test_preview_png_shows_subjects(demo_cfg, tmp_path):
    path = write_preview(ensure_demo_dataset(demo_cfg), tmp_path / "preview.png", n_subjects=2)
    picture = matplotlib.image.imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture.std() > 0.05


def test_demo_cli_builds_and_writes_a_preview(tmp_path, capsys):
    out = tmp_path / "preview.png"
    demo_main(["--preview", str(out), "--subjects", "1", "dataset.demo.n_subjects=1", "dataset.spacing=[8,8,8]",
               f"dataset.cache_dir={tmp_path / 'cache'}"])
    assert out.is_file() and (tmp_path / "cache" / "demo" / "labels" / "subject000.nii.gz").is_file()
    assert f"preview: {out}" in capsys.readouterr().out


def test_demo_needs_a_subject(demo_cfg, edit_cfg, tmp_path, capsys):
    with pytest.raises(UserError, match="n_subjects"):
        ensure_demo_dataset(edit_cfg(demo_cfg, {"cache_dir": str(tmp_path), "demo.n_subjects": 0}))
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, exit code 2
        demo_main(["dataset.demo.n_subjects=0", f"dataset.cache_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: dataset.demo.n_subjects")
