"""evaluation.label_plausibility and evaluation.labelmaps: known values on hand-built maps (adjacency, holes,
speckle, hosts), and the CLI on small synthetic "brains": a copied training map is flagged, requested == measured
attributes correlate perfectly."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dataset.attributes import as_row, measure
from dataset.io import save_nifti
from evaluation.label_plausibility import (adjacency_counts, adjacency_fractions, adjacency_l1, component_sizes,
                                          count_holes, host_counts)
from evaluation.labelmaps import LabelMap, host_classes_of, on_common_grid, run, within_seed_volume
from utils.errors import UserError

SPACING = (2.0, 2.0, 2.0)


def test_adjacency_of_a_hand_built_map():
    label = np.array([[0, 1], [1, 2], [2, 2]])[:, :, None]  # 3 x 2 x 1
    counts = adjacency_counts(label, 3)
    # axis 0: (0,1) (1,2) | (1,2) (2,2); axis 1: (0,1) (1,2) (2,2): two 0-1 faces, three 1-2 faces
    np.testing.assert_array_equal(counts, [[0, 2, 0], [2, 0, 3], [0, 3, 0]])
    fractions = adjacency_fractions(counts)
    np.testing.assert_allclose(fractions[np.triu_indices(3, 1)], [0.4, 0.0, 0.6])
    only_01 = adjacency_fractions(adjacency_counts(np.array([0, 1])[:, None, None], 3))
    assert adjacency_l1(fractions, only_01) == pytest.approx(0.6 + 0.6)
    assert adjacency_l1(fractions, fractions) == 0.0


def test_holes_count_enclosed_cavities_only():
    shell = np.zeros((9, 9, 13), bool)
    shell[1:8, 1:8, 1:12] = True
    assert count_holes(shell) == 0  # solid
    hollow = shell.copy()
    hollow[2:7, 2:7, 2:6] = False  # two cavities separated by a wall at z = 6
    hollow[2:7, 2:7, 7:11] = False
    assert count_holes(hollow) == 2
    opened = hollow.copy()
    opened[4, 4, 1] = False  # a face opening: the first cavity reaches the outside
    assert count_holes(opened) == 1
    ring = np.zeros((7, 7, 3), bool)
    ring[1:6, 1:6, 1] = True
    ring[2:5, 2:5, 1] = False  # a tunnel through a flat ring is not a cavity
    assert count_holes(ring) == 0
    assert count_holes(np.zeros((3, 3, 3), bool)) == 0


def test_speckle_is_the_components_below_the_size():
    mask = np.zeros((20, 20, 20), bool)
    mask[1, 1, 1] = True  # 1 voxel
    mask[5, 5, 5:8] = True  # 3 voxels
    mask[10:13, 10:12, 10:12] = True  # 12 voxels
    sizes = component_sizes(mask)
    assert sorted(sizes.tolist()) == [1, 3, 12] and int((sizes < 10).sum()) == 2


def test_common_grid_overlap_does_not_depend_on_the_other_maps():
    """Two boxes of odd and even size keep their relative placement whatever the largest box of the call is (the
    training maps' own nearest-neighbour Dice, the copy threshold, must not change with the generated set)."""
    def box(shape):
        label = np.zeros((12, 12, 12), np.int64)
        label[tuple(slice(2, 2 + n) for n in shape)] = 1
        return LabelMap("m", label, np.diag([*SPACING, 1.0]))
    a, b = box((3, 4, 5)), box((4, 4, 6))
    pairs = [on_common_grid([a, b, *extra], SPACING)[:2] for extra in ([], [box((7, 8, 9))], [box((8, 9, 10))])]
    for x, y in pairs:  # centre voxel on centre voxel: b starts one voxel before a along x and z, every time
        shift = [int(np.nonzero(y)[i].min() - np.nonzero(x)[i].min()) for i in range(3)]
        assert shift == [-1, 0, -1] and x.sum() == 60 and y.sum() == 96
        assert int(((x > 0) & (y > 0)).sum()) == 60  # a inside b


def test_a_lesion_voxel_is_hosted_by_its_nearest_other_class():
    label = np.zeros((10, 10, 10), np.int64)
    label[:5] = 2
    label[5:] = 3
    label[3:7, 3:7, 3:7] = 4  # 64 voxels: 32 replacing class 2, 32 replacing class 3
    counts = host_counts(label, 4, (1.0, 1.0, 1.0), 5)
    np.testing.assert_array_equal(counts, [0, 0, 32, 32, 0])
    assert host_counts(label, 1, (1.0, 1.0, 1.0), 5).sum() == 0
    names = ["background", "a", "b", "c", "lesion"]
    from omegaconf import OmegaConf

    derived = host_classes_of(OmegaConf.create({"host_classes": None, "host_min_share": 0.05}),
                              {"lesion": counts}, names)
    assert derived == {"lesion": [2, 3]}
    given = host_classes_of(OmegaConf.create({"host_classes": ["c", 1], "host_min_share": 0.05}),
                            {"lesion": counts}, names)
    assert given == {"lesion": [3, 1]}
    with pytest.raises(UserError, match="host_classes: 'liver'"):
        host_classes_of(OmegaConf.create({"host_classes": ["liver"], "host_min_share": 0.05}), {"lesion": counts},
                        names)


def test_within_seed_volume_by_hand():
    requested = [2, 4, 8, 2, 4, 8, 16, 2, 4, 2, 2, 4]
    measured = [1, 2, 3, 5, 3, 4, 6, 9, 9, 1, 7, 7]
    seeds = [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3]
    # seed 0 rises (rho 1); seed 1: ranks 3,1,2,4 against 1,2,3,4 (rho 0.4), not rising; seed 2 has 2 maps (left
    # out); seed 3 requests 2 mL twice (left out: the request does not vary)
    result = within_seed_volume(requested, measured, seeds)
    assert result == {"n_seeds": 2, "mean_spearman": pytest.approx((1.0 + 0.4) / 2), "share_rising": 0.5}
    flat = within_seed_volume([2, 4, 8], [5, 5, 5], [0, 0, 0])  # the request moves nothing: rho counted as 0
    assert flat == {"n_seeds": 1, "mean_spearman": 0.0, "share_rising": 0.0}
    assert within_seed_volume([2, 4], [1, 2], [0, 0]) == {"n_seeds": 0, "mean_spearman": None, "share_rising": None}


# the CLI -----------------------------------------------------------------------------------------------------
def brain(rng, shape=(24, 24, 20), lesion_radius=1.5):
    """Ellipsoid body: CSF/other (1) around grey (2) around white matter (3), one spherical lesion (4) in it."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    centre = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
    radii = np.array(shape) * rng.uniform(0.30, 0.45, 3)
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(-1))
    label = np.zeros(shape, np.int64)
    label[r < 1.0] = 1
    label[r < 0.8] = 2
    label[r < 0.6] = 3
    spot = centre + rng.uniform(-0.5, 0.5, 3)
    label[np.linalg.norm(grid - spot, axis=-1) < lesion_radius] = 4
    return label


def lps(label):
    """The same anatomy stored left-posterior first: flipped array, LPS affine, another origin."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [40.0, 30.0, -5.0]
    return label[::-1, ::-1].copy(), affine


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelmaps")
    rng = np.random.default_rng(0)
    affine = np.diag([*SPACING, 1.0])
    training = [brain(rng) for _ in range(4)]
    for i, label in enumerate(training):
        save_nifti(label, affine, root / "real" / f"case{i}.nii.gz")
    cube = np.zeros((24, 24, 20), np.int64)  # unlike any training map
    cube[2:22, 2:22, 2:18] = 1
    cube[4:20, 4:20, 4:16] = 3
    cube[5:12, 5:12, 5:12] = 4
    fakes = {"copy": lps(training[2]), "cube": (cube, affine),
             "big_lesion": (brain(np.random.default_rng(7), lesion_radius=3.5), affine)}
    measured = {}
    for name, (label, aff) in fakes.items():
        save_nifti(label, aff, root / "fake" / f"{name}.nii.gz")
        measured[name] = measure(label, aff, {"lesion": 4})
    with open(root / "requested.csv", "w", newline="") as handle:
        rows = [{"case_id": name, **as_row(m, "requested_"), **as_row(m, "measured_")} for name, m in measured.items()]
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def cfg_for(compose_cfg, folders, out, *extra):
    return compose_cfg("labelmaps", [f"real={folders / 'real'}", f"fake={folders / 'fake'}", f"out={out}",
                                     "dataset=demo", "grid_spacing=[2.0,2.0,2.0]", *extra])


def test_cli_flags_the_copy_and_measures_requested_attributes(compose_cfg, folders, tmp_path):
    report = run(cfg_for(compose_cfg, folders, tmp_path, f"requested={folders / 'requested.csv'}"))
    results = report["results"]
    assert results["novelty"]["flagged"] == ["copy"] and results["novelty"]["max_nearest_dice"] == 1.0
    assert results["novelty"]["copy_threshold"] < 1.0
    with open(tmp_path / "per_case.csv") as handle:
        rows = {row["fake"]: row for row in csv.DictReader(handle)}
    assert rows["copy"]["nearest_train"] == "case2" and float(rows["copy"]["nearest_dice"]) == 1.0
    assert rows["cube"]["flagged_copy"] == "False"
    fidelity = results["attribute_fidelity"]["lesion"]
    assert fidelity["volume"]["n"] == 3
    assert fidelity["volume"]["spearman"] == pytest.approx(1.0) and fidelity["volume"]["pearson"] == pytest.approx(1.0)
    assert fidelity["volume"]["median_abs_error_ml"] == 0.0
    assert "within_seed" not in fidelity["volume"]  # the CSV has no seed_index column
    assert fidelity["centroid"]["median_error_mm"] == pytest.approx(0.0, abs=1e-9)
    assert fidelity["count"]["share_exact"] == 1.0
    plaus = results["plausibility"]
    assert plaus["host_classes"] == {"lesion": ["white_matter"]}  # every training lesion sits in white matter
    assert plaus["real"]["host_share"]["lesion"] == 1.0
    assert plaus["real"]["per_class"]["white_matter"]["components"] == 1.0
    assert plaus["real"]["per_class"]["white_matter"]["holes"] == 1.0  # the lesion is a cavity of white matter
    # the cube map has no grey matter: its 1-3 faces are new, so the adjacency differs from the training maps'
    assert 0 < plaus["adjacency_l1"] <= 2
    written = json.loads((tmp_path / "labelmaps.json").read_text())
    assert written["results"]["novelty"]["flagged"] == ["copy"]
    for name in ("volume_histograms", "adjacency", "nearest_dice"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0
    with pytest.raises(UserError, match="already exists"):
        run(cfg_for(compose_cfg, folders, tmp_path))


def test_cli_bad_inputs_write_nothing(compose_cfg, folders, tmp_path):
    out = tmp_path / "out"
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("case_id,requested_lesion_volume_ml\nnot_a_map,3\n")
    negative = tmp_path / "negative.csv"
    negative.write_text("case_id,requested_lesion_volume_ml\ncopy,-3\n")
    for extra, message in (([f"requested={bad_csv}"], "not_a_map has no generated label map"),
                           ([f"requested={negative}"], "line 2: lesion_volume_ml=-3.0"),
                           (["speckle_voxels=0"], "speckle_voxels=0"),
                           ([f"fake={folders / 'real'}"], "same folder"),
                           (["dataset.label_nc=4", "dataset.class_names=[a,b,c,d]", "dataset.lesion_classes=[d]"],
                            "label values outside 0..3")):
        with pytest.raises(UserError, match=message):
            run(cfg_for(compose_cfg, folders, out, *extra))
    assert not out.exists()


def test_real_defaults_to_the_training_split(compose_cfg, phantom_root, tmp_path):
    """real=null: the training maps of `dataset`; a training map copied into fake= is flagged."""
    import shutil

    overrides = ["dataset=nifti", f"dataset.root_dir={phantom_root}", "dataset.label_nc=3", "dataset.modality=mr",
                 "dataset/intensity=percentile", "dataset.spacing=[1.0,1.0,2.0]", "dataset.name=phantom"]
    from dataset.datamodule import split_cases

    train = split_cases(compose_cfg("check", overrides).dataset)["train"]
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(train[0].label_path, fake / "copied.nii.gz")
    report = run(compose_cfg("labelmaps", [*overrides, f"fake={fake}", f"out={tmp_path / 'out'}"]))
    assert report["settings"]["n_real"] == len(train) and report["results"]["novelty"]["flagged"] == ["copied"]
