import hashlib
import json

import matplotlib.image
import numpy as np
import pytest
from scipy import ndimage

from dataset.demo import (
    HOSTS,
    LESION,
    RING_MIN_RADIUS_MM,
    Lesion,
    _lesion_distance,
    build_demo_dataset,
    ensure_demo_dataset,
    lesion_settings,
    load_templates,
    make_subject,
    plan_lesions,
    subject_ids,
    subject_rngs,
    write_preview,
)
from dataset.demo import main as demo_main
from dataset.io import load_nifti
from dataset.validate import validate_dataset
from utils.errors import UserError


def _subject(root, case_id):
    image, affine = load_nifti(root / "images" / f"{case_id}.nii.gz")
    label, label_affine = load_nifti(root / "labels" / f"{case_id}.nii.gz")
    assert np.array_equal(affine, label_affine)
    return image, label, affine


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.nii.gz"))}


def test_demo_is_built_once_into_the_cache_with_the_expected_layout(demo_cfg, isolated_cache):
    root = ensure_demo_dataset(demo_cfg)
    assert root == isolated_cache / "medlsdm" / "demo"
    assert sorted(p.name for p in root.iterdir()) == ["demo.json", "images", "labels", "lesions.json"]
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{c}.nii.gz" for c in subject_ids(6)]
    assert json.loads((root / "demo.json").read_text())["n_subjects"] == 6
    assert sorted(json.loads((root / "lesions.json").read_text())) == subject_ids(6)
    stamp = (root / "images" / "subject000.nii.gz").stat().st_mtime_ns
    assert ensure_demo_dataset(demo_cfg) == root  # reused, not rebuilt
    assert (root / "images" / "subject000.nii.gz").stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".demo")]  # no temporary folders left


def test_demo_subjects_have_ordered_tissues_and_lesions_of_their_recorded_appearance(demo_cfg):
    root = ensure_demo_dataset(demo_cfg)
    recorded = json.loads((root / "lesions.json").read_text())
    shapes, appearances = set(), set()
    for case_id in subject_ids(6):
        image, label, affine = _subject(root, case_id)
        shapes.add(image.shape)
        np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), [6.0, 6.0, 6.0])
        assert image.dtype == np.int16 and label.dtype == np.uint8
        lesions = recorded[case_id]
        assert set(np.unique(label)) == {0, 1, 2, 3} | ({LESION} if lesions else set()), case_id
        median = [np.median(image[label == k]) for k in range(4)]
        assert median[0] < median[1] < median[2] < median[3], (case_id, median)
        assert (label == LESION).sum() == sum(lesion["n_voxels"] for lesion in lesions)
        white = label == HOSTS["white_matter"]
        for lesion in lesions:
            centre = tuple(lesion["centre_voxel"])
            assert label[centre] == LESION
            box = tuple(slice(max(c - 4, 0), c + 5) for c in centre)  # the bias field is smooth: compare locally
            local_white = np.median(image[box][white[box]])
            if lesion["appearance"] == "ring":  # the centre is in the core, darker than white matter
                assert image[centre] < 0.85 * local_white, (case_id, lesion)
            else:  # brighter than every tissue
                assert image[centre] > 1.1 * local_white, (case_id, lesion)
            appearances.add(lesion["appearance"])
    assert shapes == {(33, 39, 32)}  # the 197x233x189 mm template field of view at 6 mm
    assert appearances == {"ring", "homogeneous"}
    summary = validate_dataset(demo_cfg)
    assert len(summary.cases) == 6 and "lesion" in "\n".join(summary.lines())


def test_lesion_plans_span_the_configured_ranges(compose_cfg):
    demo = compose_cfg("check", ["dataset=demo"]).dataset.demo
    settings = lesion_settings(demo)
    assert settings["count"] == [0, 4] and settings["radius_mm"] == [3.0, 15.0]
    plans = [plan_lesions(subject_rngs(int(demo.seed), i)[1], settings) for i in range(int(demo.n_subjects))]
    assert sorted({len(plan) for plan in plans}) == [0, 1, 2, 3, 4]
    lesions = [lesion for plan in plans for lesion in plan]
    radii = np.array([lesion.radius_mm for lesion in lesions])
    assert 3.0 <= radii.min() < 4.0 and 14.0 < radii.max() <= 15.0
    assert {lesion.host for lesion in lesions} == {"white_matter", "grey_matter"}
    assert {lesion.shape for lesion in lesions} == {"ellipsoid", "lumpy"}
    assert {lesion.appearance for lesion in lesions} == {"homogeneous", "ring"}
    assert min(lesion.radius_mm for lesion in lesions if lesion.appearance == "ring") >= RING_MIN_RADIUS_MM
    narrow = dict(settings, count=[2, 2], hosts=["grey_matter"], appearances=["ring"])
    plan = plan_lesions(np.random.default_rng(0), narrow)
    assert len(plan) == 2 and {(lesion.host, lesion.appearance) for lesion in plan} == {("grey_matter", "ring")}


def test_lesions_lie_inside_their_host_and_never_touch(demo_cfg):
    templates, _ = load_templates(demo_cfg.spacing)
    settings = lesion_settings(demo_cfg.demo)
    hosts = set()
    for index in range(4):
        rngs = subject_rngs(int(demo_cfg.demo.seed), index)
        subject = make_subject(templates, demo_cfg.spacing, rngs, settings)
        assert subject.lesions == plan_lesions(subject_rngs(int(demo_cfg.demo.seed), index)[1], settings)
        union = np.zeros(subject.label.shape, dtype=bool)
        for lesion, mask, centre in zip(subject.lesions, subject.masks, subject.centres):
            assert mask[centre] and mask.sum() >= 1
            assert np.all(subject.tissue[mask] == HOSTS[lesion.host]), lesion
            assert not (ndimage.binary_dilation(mask) & union).any()  # not even a neighbour of another lesion
            union |= mask
            hosts.add(lesion.host)
        np.testing.assert_array_equal(subject.label == LESION, union)
        np.testing.assert_array_equal(subject.label[~union], subject.tissue[~union])
    assert hosts == {"white_matter", "grey_matter"}


@pytest.mark.parametrize("shape", ["ellipsoid", "lumpy"])
def test_lesion_radius_is_the_equivalent_sphere_radius(shape):
    step = 0.5  # mm
    axis = np.arange(-30.0, 30.0 + step, step)
    offsets = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).astype(np.float32)
    for radius in (6.0, 12.0):
        distance = _lesion_distance(np.random.default_rng(1), Lesion("white_matter", radius, shape, "ring"), offsets)
        volume = (distance < 1.0).sum() * step ** 3
        tolerance = 0.03 if shape == "ellipsoid" else 0.3  # lumps add and remove volume
        assert volume == pytest.approx(4 / 3 * np.pi * radius ** 3, rel=tolerance)


def test_demo_builds_byte_identical_subjects(demo_cfg, tmp_path):
    root = ensure_demo_dataset(demo_cfg)
    build_demo_dataset(tmp_path, demo_cfg, indices=[1, 4])  # a partial build: the same bytes as the full one
    assert not (tmp_path / "demo.json").exists()  # not mistaken for a complete build
    rebuilt = _hashes(tmp_path)
    assert sorted(rebuilt) == [f"{folder}/subject00{i}.nii.gz" for folder in ("images", "labels") for i in (1, 4)]
    assert rebuilt == {name: digest for name, digest in _hashes(root).items() if name in rebuilt}
    recorded = json.loads((root / "lesions.json").read_text())
    assert json.loads((tmp_path / "lesions.json").read_text()) == {c: recorded[c] for c in ("subject001", "subject004")}


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


@pytest.mark.parametrize("key, value, message", [
    ("count", [3, 1], "count"), ("radius_mm", [0.0, 5.0], "radius_mm"), ("hosts", ["csf_other"], "hosts"),
    ("appearances", [], "appearances"), ("shapes", ["cube"], "shapes"),
])
def test_bad_lesion_settings_are_user_errors(demo_cfg, edit_cfg, tmp_path, key, value, message):
    cfg = edit_cfg(demo_cfg, {"cache_dir": str(tmp_path), f"demo.lesions.{key}": value})
    with pytest.raises(UserError, match=f"dataset.demo.lesions.{message}"):
        ensure_demo_dataset(cfg)
    assert not (tmp_path / "demo").exists()


def test_demo_needs_a_subject(demo_cfg, edit_cfg, tmp_path, capsys):
    with pytest.raises(UserError, match="n_subjects"):
        ensure_demo_dataset(edit_cfg(demo_cfg, {"cache_dir": str(tmp_path), "demo.n_subjects": 0}))
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, exit code 2
        demo_main(["dataset.demo.n_subjects=0", f"dataset.cache_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: dataset.demo.n_subjects")
