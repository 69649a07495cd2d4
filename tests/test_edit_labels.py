"""Label-map editing: each operation against voxels known by construction, on isotropic, anisotropic and oblique
grids; every anatomical check; the file round trip and the command line."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dataset.edit_labels import (EditOptions, edit_label_file, edit_label_map, insert_lesion, move_component,
                                 offset_to_voxels, remove_component, scale_component)
from utils.errors import UserError
from utils.paths import PROJECT_ROOT

SHAPE = (24, 22, 16)
ORGAN, VESSEL, LESION = 1, 3, 4
BIG = (slice(6, 10), slice(6, 10), slice(5, 9))  # 4x4x4 = 64 voxels
SMALL = (slice(12, 14), slice(12, 14), slice(10, 12))  # 2x2x2 = 8 voxels


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _affine(linear, translation) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, translation
    return affine


AFFINES = {
    "iso": _affine(np.eye(3), [-12.0, -11.0, -8.0]),
    "aniso": _affine(np.diag([0.8, 1.5, 3.0]), [-10.0, 5.0, 20.0]),
    "oblique": _affine(_rotation(2, 30) @ _rotation(0, 20) @ np.diag([-1.0, 1.2, 2.0]), [40.0, -12.0, 7.0]),
}


def phantom() -> np.ndarray:
    """Background 0, an organ (1) holding a vessel (3), a 64-voxel lesion (4) and an 8-voxel lesion (4)."""
    labels = np.zeros(SHAPE, dtype=np.int64)
    labels[2:22, 2:20, 1:15] = ORGAN
    labels[17:20, 2:20, 1:15] = VESSEL
    labels[BIG] = LESION
    labels[SMALL] = LESION
    return labels


def box_mask(box) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[box] = True
    return mask


def world(affine, voxels) -> np.ndarray:
    return np.asarray(voxels, dtype=float) @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(params=sorted(AFFINES))
def affine(request):
    return AFFINES[request.param]


# ---------------------------------------------------------------- move

def test_move_shifts_the_component_exactly(affine):
    labels = phantom()
    offset_mm = affine[:3, :3] @ np.array([2.0, 0.0, 1.0])  # two voxels along i, one along k, in world mm
    result = move_component(labels, affine, LESION, offset_mm=offset_mm)
    moved = box_mask((slice(8, 12), slice(6, 10), slice(6, 10)))
    expected = labels.copy()
    expected[BIG] = ORGAN
    expected[moved] = LESION
    np.testing.assert_array_equal(result.labels, expected)
    assert result.changed_voxels == 2 * (64 - 2 * 4 * 3)
    assert result.voxels_before == result.voxels_after == 64
    assert result.labels.shape == SHAPE and labels[BIG].min() == LESION  # the input array is untouched


def test_move_rounds_offsets_to_the_nearest_voxel_and_fills_with_fill_class(affine):
    offset_mm = affine[:3, :3] @ np.array([2.3, -0.4, 0.6])
    np.testing.assert_array_equal(offset_to_voxels(affine, offset_mm), [2, 0, 1])
    result = move_component(phantom(), affine, LESION, offset_mm=offset_mm, options=EditOptions(fill_class=0))
    assert (result.labels[6:8, 6:10, 5:9] == 0).all()
    assert (result.labels[8:12, 6:10, 6:10] == LESION).all()


def test_move_on_the_anisotropic_grid_uses_the_spacing():
    result = move_component(phantom(), AFFINES["aniso"], LESION, offset_mm=[1.6, 3.0, -3.0])  # 2, 2, -1 voxels
    assert (result.labels[8:12, 8:12, 4:8] == LESION).all()
    assert result.voxels_after == 64


# ---------------------------------------------------------------- scale

def test_scale_by_two_multiplies_the_volume_by_eight(affine):
    result = scale_component(phantom(), affine, LESION, factor=2)
    grown = box_mask((slice(4, 12), slice(4, 12), slice(3, 11)))  # centroid (7.5, 7.5, 6.5), 8 voxels a side
    assert result.voxels_after == 8 * 64
    np.testing.assert_array_equal(result.labels == LESION, grown | box_mask(SMALL))
    assert (result.labels[~grown] == phantom()[~grown]).all()


def test_scale_shrinks_and_fills_the_rim_with_the_host():
    result = scale_component(phantom(), AFFINES["aniso"], LESION, factor=0.5)
    assert result.voxels_after == 8
    assert ((result.labels == LESION) & box_mask(BIG)).sum() == 8
    assert (result.labels[BIG][result.labels[BIG] != LESION] == ORGAN).all()


def test_scale_per_world_axis_follows_the_affine():
    # aniso is axis-aligned: a factor of 2 along world x doubles voxel axis i only
    result = scale_component(phantom(), AFFINES["aniso"], LESION, factor=[2, 1, 1])
    assert result.voxels_after == 128
    np.testing.assert_array_equal(np.argwhere(result.labels[:, 7, 6] == LESION).ravel(), np.arange(4, 12))


# ---------------------------------------------------------------- insert

def ellipsoid_reference(affine, center_mm, radii) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).reshape(-1, 3)
    inside = (((world(affine, grid) - center_mm) / radii) ** 2).sum(axis=1) <= 1.0
    return inside.reshape(SHAPE)


def test_insert_ellipsoid_matches_the_analytic_volume(affine):
    labels = phantom()
    labels[labels == LESION] = ORGAN
    center_mm = world(affine, [10.0, 11.0, 8.0])
    radii = np.array([5.0, 5.0, 6.0])
    result = insert_lesion(labels, affine, LESION, radius_mm=radii, center_mm=center_mm)
    inserted = result.labels == LESION
    np.testing.assert_array_equal(inserted, ellipsoid_reference(affine, center_mm, radii))
    volume = result.voxels_after * result.voxel_volume_mm3
    assert volume == pytest.approx(4 / 3 * np.pi * radii.prod(), rel=0.1)
    assert (result.labels[~inserted] == labels[~inserted]).all()


def test_insert_at_a_voxel_centre_with_a_scalar_radius():
    result = insert_lesion(phantom(), AFFINES["iso"], 2, radius_mm=2.0, center_vox=[12, 14, 6])
    assert result.voxels_after == 33  # lattice points of Z^3 within distance 2
    assert result.labels[12, 14, 6] == 2 and result.labels[12, 14, 8] == 2 and result.labels[12, 14, 9] == ORGAN


def test_insert_blob_is_seeded_connected_and_of_the_requested_size():
    labels = phantom()
    labels[labels == LESION] = ORGAN
    kwargs = dict(radius_mm=[4.0, 4.0, 5.0], center_vox=[11, 11, 8], shape="blob", blob_amplitude=0.3)
    first = insert_lesion(labels, AFFINES["iso"], 2, seed=1, **kwargs).labels == 2
    again = insert_lesion(labels, AFFINES["iso"], 2, seed=1, **kwargs).labels == 2
    other = insert_lesion(labels, AFFINES["iso"], 2, seed=2, **kwargs).labels == 2
    ellipsoid = insert_lesion(labels, AFFINES["iso"], 2, radius_mm=[4.0, 4.0, 5.0], center_vox=[11, 11, 8]).labels == 2
    np.testing.assert_array_equal(first, again)
    assert (first != other).any() and (first != ellipsoid).any()
    assert ndimage.label(first, structure=np.ones((3, 3, 3)))[1] == 1
    assert 0.7 ** 3 * ellipsoid.sum() < first.sum() < 1.3 ** 3 * ellipsoid.sum()


# ---------------------------------------------------------------- remove and component choice

def test_remove_leaves_no_voxel_of_the_component(affine):
    labels = phantom()
    result = remove_component(labels, affine, LESION)
    assert (result.labels[BIG] == ORGAN).all()
    assert (result.labels == LESION).sum() == 8  # the other component stays
    assert result.changed_voxels == 64 and result.voxels_after == 0


@pytest.mark.parametrize("options", [EditOptions(component=1), EditOptions(at=[13, 12, 11])])
def test_component_index_and_at_select_the_small_lesion(options):
    result = remove_component(phantom(), AFFINES["iso"], LESION, options=options)
    assert (result.labels[SMALL] == ORGAN).all() and (result.labels[BIG] == LESION).all()


# ---------------------------------------------------------------- anatomical checks

@pytest.mark.parametrize("op,args,options,message", [
    ("move", {"offset_mm": [9, 0, 0]}, EditOptions(), "only 50.0% of the moved lesion of class 4 lies inside host"),
    ("move", {"offset_mm": [9, 0, 0]}, EditOptions(forbidden_classes=[3]), "overlap forbidden class(es) [3]"),
    ("move", {"offset_mm": [0, 0, 7]}, EditOptions(), "lies inside host class(es) [1]"),
    ("move", {"offset_mm": [0, 0, 12]}, EditOptions(), "would leave the volume"),
    ("scale", {"factor": 5}, EditOptions(), "would leave the volume"),
    ("scale", {"factor": 0.1}, EditOptions(), "would be empty"),
    ("insert", {"radius_mm": 3, "center_vox": [18, 10, 8]}, EditOptions(forbidden_classes=[3]), "forbidden"),
    ("insert", {"radius_mm": 3, "center_vox": [3, 10, 8]}, EditOptions(), "lies inside host class(es) [1]"),
    ("insert", {"radius_mm": 3, "center_vox": [1, 10, 8]}, EditOptions(host_classes=[0, 1]), "leave the volume"),
    ("remove", {}, EditOptions(label_nc=4), "class 4 is not below label_nc=4"),
    ("remove", {}, EditOptions(component=2), "component=2 but class 4 has 2 component(s)"),
    ("remove", {}, EditOptions(at=[0, 0, 0]), "has class 0, not 4"),
])
def test_anatomical_and_input_checks_raise(op, args, options, message):
    with pytest.raises(UserError, match=r"^case\.nii\.gz: .*" + re.escape(message)):
        edit_label_map(phantom(), AFFINES["iso"], op, LESION, options=options, source="case.nii.gz", **args)


def test_forbidden_check_wins_over_host_fraction():
    message = "the moved lesion of class 4 would overlap forbidden class(es) [3] (32 voxels)"
    with pytest.raises(UserError, match=re.escape(message)):
        move_component(phantom(), AFFINES["iso"], LESION, offset_mm=[9, 0, 0],
                       options=EditOptions(forbidden_classes=[3], min_inside_fraction=0.0), source="case.nii.gz")


def test_min_inside_fraction_and_host_classes_relax_the_host_check():
    # 3 of 4 slices of the moved cube stay in the organ, one lands in background
    options = EditOptions(min_inside_fraction=0.75)
    result = move_component(phantom(), AFFINES["iso"], LESION, offset_mm=[0, 0, 7], options=options)
    assert (result.labels[6:10, 6:10, 12:16] == LESION).all()
    with pytest.raises(UserError, match=r"only 75\.0% .* \(min_inside_fraction=0\.8\)"):
        move_component(phantom(), AFFINES["iso"], LESION, offset_mm=[0, 0, 7], options=EditOptions(
            min_inside_fraction=0.8))
    result = move_component(phantom(), AFFINES["iso"], LESION, offset_mm=[0, 0, 7],
                            options=EditOptions(host_classes=[0, 1]))
    assert result.voxels_after == 64


def test_class_checks():
    with pytest.raises(UserError, match="class 7 is not present"):
        remove_component(phantom(), AFFINES["iso"], 7, source="case.nii.gz")
    with pytest.raises(UserError, match="label map holds class 4, not below label_nc=3"):
        insert_lesion(phantom(), AFFINES["iso"], 2, radius_mm=2, center_vox=[12, 14, 6],
                      options=EditOptions(label_nc=3))
    with pytest.raises(UserError, match="insert needs exactly one of center_mm"):
        insert_lesion(phantom(), AFFINES["iso"], 2, radius_mm=2)
    with pytest.raises(UserError, match="radius_mm=-1: expected a positive number"):
        insert_lesion(phantom(), AFFINES["iso"], 2, radius_mm=-1, center_vox=[12, 14, 6])


# ---------------------------------------------------------------- files and command line

def write_input(path, affine, dtype=np.int16) -> None:
    image = nib.Nifti1Image(phantom().astype(dtype), affine)
    image.header["descrip"] = b"patient Jane Doe 1970"
    nib.save(image, str(path))


def test_file_round_trip_keeps_the_grid_and_drops_metadata(tmp_path, affine):
    source, target = tmp_path / "labels.nii.gz", tmp_path / "edited.nii.gz"
    write_input(source, affine)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    result = edit_label_file(source, target, "insert", 9, radius_mm=2.5, center_vox=[12, 12, 6])
    image = nib.load(str(target))
    original = nib.load(str(source))
    assert image.shape == original.shape and np.array_equal(image.affine, original.affine)
    assert image.get_data_dtype() == np.int16 and image.header["descrip"].item() == b""
    np.testing.assert_array_equal(np.asarray(image.dataobj), result.labels)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    with pytest.raises(UserError, match="already exists"):
        edit_label_file(source, target, "remove", LESION)
    with pytest.raises(UserError, match="must differ from the input"):
        edit_label_file(source, source, "remove", LESION, overwrite=True)


def test_float_label_maps_are_accepted_only_with_whole_numbers(tmp_path):
    source = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(phantom().astype(np.float32) + 0.25, AFFINES["iso"]), str(source))
    with pytest.raises(UserError, match="float.nii.gz: not a label map"):
        edit_label_file(source, tmp_path / "out.nii.gz", "remove", LESION)


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", "dataset.edit_labels", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path):
    source, target = tmp_path / "labels.nii.gz", tmp_path / "out" / "moved.nii.gz"
    write_input(source, AFFINES["aniso"], dtype=np.uint8)
    args = [f"in={source}", f"out={target}", "op=move", "class=4", "offset_mm=[1.6,3.0,-3.0]"]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "move class 4: 104 voxels changed" in done.stdout and "230.4 -> 230.4 mm^3" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    assert (np.asarray(nib.load(str(target)).dataobj)[8:12, 8:12, 4:8] == LESION).all()

    before = target.read_bytes()
    refused = run_cli(*args[:-1], "offset_mm=[0,0,3]")
    assert refused.returncode == 2 and "already exists" in refused.stderr and target.read_bytes() == before
    assert run_cli(*args[:-1], "offset_mm=[0,0,3]", "overwrite=true").returncode == 0
    assert target.read_bytes() != before


@pytest.mark.parametrize("extra,message", [
    (["op=remove", "class=6"], "labels.nii.gz: class 6 is not present"),
    (["op=move", "class=4", "offset_mm=[0,0,30]"], "would leave the volume"),
    (["op=remove", "class=4", "offset_mm=[1,0,0]"], "offset_mm=[1, 0, 0]: not used by op=remove"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
    source, target = tmp_path / "labels.nii.gz", tmp_path / "out.nii.gz"
    write_input(source, AFFINES["iso"])
    done = run_cli(f"in={source}", f"out={target}", *extra)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]
