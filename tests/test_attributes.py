"""Lesion attributes against hand computation (two cubes of known size and position on an anisotropic grid), the
checks of requested attributes, the empirical draw of unset ones, and the CSV round trip."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from omegaconf import OmegaConf

from dataset.attributes import (LesionAttributes, as_row, body_box, check_requested, draw_case,
                                fill_attributes, lesion_classes, measure, read_requested_csv,
                                read_seed_index)
from utils.errors import UserError

LESION = {"lesion": 2}
SPACING = (2.0, 1.0, 3.0)  # mm; a voxel is 6 mm^3


def two_cubes(affine_diag=SPACING):
    """Body (class 1) over x 2..17, y 1..8, z 1..6; lesion cubes of 3^3 voxels at x 4..6, y 2..4, z 2..4 and of
    2^3 voxels at x 12..13, y 5..6, z 3..4."""
    label = np.zeros((20, 10, 8), np.int64)
    label[2:18, 1:9, 1:7] = 1
    label[4:7, 2:5, 2:5] = 2
    label[12:14, 5:7, 3:5] = 2
    affine = np.diag([*affine_diag, 1.0])
    affine[:3, 3] = [-30.0, 7.0, 100.0]
    return label, affine


def test_two_cubes_volume_count_and_centroid_by_hand():
    label, affine = two_cubes()
    found = measure(label, affine, LESION)["lesion"]
    assert found.volume_ml == pytest.approx((27 + 8) * 6.0 / 1000.0)  # 0.21 mL
    assert found.count == 2
    # largest cube's centre: voxel (5, 3, 3); body box in voxels x 2..17, y 1..8, z 1..6 (the world scale cancels)
    assert found.centroid == pytest.approx(((5 - 2) / 15, (3 - 1) / 7, (3 - 1) / 5))
    low, high = body_box(label, affine)
    np.testing.assert_allclose(low, [-30 + 4, 7 + 1, 100 + 3])
    np.testing.assert_allclose(high, [-30 + 34, 7 + 8, 100 + 18])


def test_centroid_is_in_ras_order_whatever_the_array_orientation():
    label, affine = two_cubes()
    flipped = affine.copy()
    flipped[0, 0] = -2.0  # array axis 0 runs right to left: the RAS r coordinate reverses
    assert measure(label, flipped, LESION)["lesion"].centroid == pytest.approx((1 - 3 / 15, 2 / 7, 2 / 5))
    # array axes (z, x, y) -> world (R, A, S): the same anatomy stored transposed gives the same attributes
    permuted = np.zeros((4, 4))
    permuted[0, 1] = SPACING[0]
    permuted[1, 2] = SPACING[1]
    permuted[2, 0] = SPACING[2]
    permuted[:, 3] = [-30.0, 7.0, 100.0, 1.0]
    permuted[3, 3] = 1.0
    found = measure(np.transpose(label, (2, 0, 1)), permuted, LESION)["lesion"]
    assert found.centroid == pytest.approx((3 / 15, 2 / 7, 2 / 5))
    assert found.volume_ml == pytest.approx(0.21)


def test_components_use_26_connectivity_and_an_absent_class_has_no_centroid():
    label = np.ones((6, 6, 6), np.int64)
    label[1, 1, 1] = label[2, 2, 2] = 2  # touch at a corner only: one component
    label[4, 4, 4] = 2
    found = measure(label, np.eye(4), {"lesion": 2, "other": 3})
    assert found["lesion"].count == 2 and found["lesion"].volume_ml == pytest.approx(3e-3)
    assert found["other"] == LesionAttributes(volume_ml=0.0, count=0, centroid=None)


def test_requested_attributes_are_checked():
    names = ["lesion"]
    assert check_requested({"lesion_volume_ml": 12, "lesion_count": 2, "lesion_centroid": [0.3, 0.5, 0.6]},
                           names) == {"lesion": {"volume_ml": 12.0, "count": 2, "centroid": (0.3, 0.5, 0.6)}}
    assert check_requested({"lesion_volume_ml": None}, names) == {}
    two = ["lesion", "cyst"]
    cfg = OmegaConf.create({"lesion_volume_ml": {"cyst": 1.5}, "lesion_count": {"lesion": 0}})
    assert check_requested(cfg, two) == {"cyst": {"volume_ml": 1.5}, "lesion": {"count": 0}}
    bad = [({"lesion_volume_ml": -1}, names, "lesion_volume_ml=-1: must be a lesion volume"),
           ({"lesion_volume_ml": "big"}, names, "lesion_volume_ml=big"),
           ({"lesion_count": -1}, names, "lesion_count=-1: must be a whole number"),
           ({"lesion_count": 2.5}, names, "lesion_count=2.5"),
           ({"lesion_centroid": [0.3, 1.2, 0.6]}, names, r"lesion_centroid=\[0.3, 1.2, 0.6\]: must be 3"),
           ({"lesion_centroid": [0.3, 0.5]}, names, "lesion_centroid"),
           ({"lesion_volume_ml": {"tumour": 3}}, names, "unknown lesion class 'tumour'"),
           ({"lesion_volume_ml": 3}, two, "2 lesion classes"),
           ({"lesion_volume_ml": 3}, [], "0 lesion classes"),
           ({"lesion_count": 0, "lesion_volume_ml": 4}, names, "ask for a lesion and for none")]
    for request, classes, message in bad:
        with pytest.raises(UserError, match=message) as info:
            check_requested(request, classes)
        assert "\n" not in str(info.value)


def draw_attributes(requested, table, rng, nearest=None):
    return fill_attributes(requested, draw_case(requested, table, rng, nearest), ["lesion"])["lesion"]


def test_unset_attributes_come_from_one_compatible_training_case():
    table = [{"lesion": LesionAttributes(0.0, 0, None)},
             {"lesion": LesionAttributes(1.0, 1, (0.1, 0.2, 0.3))},
             {"lesion": LesionAttributes(5.0, 3, (0.7, 0.8, 0.9))}]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        drawn = draw_attributes({"lesion": {"volume_ml": 12.0}}, table, rng)
        assert drawn.volume_ml == 12.0
        assert (drawn.count, drawn.centroid) in {(1, (0.1, 0.2, 0.3)), (3, (0.7, 0.8, 0.9))}  # jointly, one case
        seen.add(drawn.count)
    assert seen == {1, 3}  # both lesion cases are drawn, never the lesion-free one
    none = draw_attributes({"lesion": {"count": 0}}, table, rng)
    assert none == LesionAttributes(0.0, 0, None)
    free = [draw_attributes({}, table, np.random.default_rng(s)).count for s in range(30)]
    assert set(free) == {0, 1, 3}
    with pytest.raises(UserError, match="no training case agrees"):
        draw_attributes({"lesion": {"count": 2}}, table[:1], rng)


def test_nearest_draws_come_from_the_training_cases_closest_to_the_request():
    # lesions of 1..10 mL, case i's centroid at (i/10, 0.5, 0.5) and count 1 + i % 3; one lesion-free case
    table = [{"lesion": LesionAttributes(float(i), 1 + i % 3, (i / 10, 0.5, 0.5))} for i in range(1, 11)]
    table.append({"lesion": LesionAttributes(0.0, 0, None)})

    def draws(requested, nearest, n=60):
        return {draw_attributes(requested, table, np.random.default_rng(s), nearest).centroid[0] for s in range(n)}

    assert draws({"lesion": {"volume_ml": 9.6}}, 2) == {0.9, 1.0}       # log(1 + mL): 9 and 10 mL are nearest
    assert draws({"lesion": {"volume_ml": 9.6}}, None) == {i / 10 for i in range(1, 11)}  # any lesion case
    near = {draw_attributes({"lesion": {"centroid": (0.28, 0.5, 0.5)}}, table, np.random.default_rng(s), 3).volume_ml
            for s in range(60)}
    assert near == {2.0, 3.0, 4.0}
    # volume and count together: 4 mL has count 2, as asked; 3 and 5 mL are as near in volume but count 1 and 3
    assert draws({"lesion": {"volume_ml": 4.0, "count": 2}}, 1) == {0.4}
    # nothing numeric asked: every agreeing case stays a candidate, whatever nearest says
    assert {draw_attributes({}, table, np.random.default_rng(s), 1).count for s in range(200)} == {0, 1, 2, 3}
    assert draw_attributes({"lesion": {"count": 0}}, table, np.random.default_rng(0), 1).volume_ml == 0.0
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="draw_nearest"):
            draw_case({}, table, np.random.default_rng(0), bad)


def test_lesion_classes_come_from_the_data_set_config(compose_cfg):
    demo = compose_cfg("check", ["dataset=demo"]).dataset
    assert lesion_classes(demo) == {"lesion": 4}
    cfg = OmegaConf.create({"label_nc": 3, "class_names": None, "lesion_classes": [2]})
    assert lesion_classes(cfg) == {"class_2": 2}
    for entries, message in (([0], "not a foreground class"), (["tumour"], "'tumour' is not a foreground")):
        with pytest.raises(UserError, match=message):
            lesion_classes(OmegaConf.create({"label_nc": 3, "class_names": None, "lesion_classes": entries}))


def test_csv_rows_round_trip_the_requests(tmp_path):
    request = {"lesion": {"volume_ml": 2.5, "centroid": (0.25, 0.5, 0.75)}}
    measured = measure(*two_cubes(), LESION)
    rows = [{"case_id": "gen000", **as_row(request, "requested_"), **as_row(measured, "measured_")},
            {"case_id": "gen001", **as_row({"lesion": {"count": 1}}, "requested_")}]
    path = tmp_path / "attributes.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert read_requested_csv(path, ["lesion"]) == {"gen000": request, "gen001": {"lesion": {"count": 1}}}
    rows[1]["requested_lesion_volume_ml"] = -3
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(UserError, match="line 3: lesion_volume_ml"):
        read_requested_csv(path, ["lesion"])


def test_seed_index_column_is_read_and_checked(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("case_id,seed_index,requested_lesion_volume_ml\ngen0000,0,2\ngen0001,1,4\n")
    assert read_seed_index(good) == {"gen0000": 0, "gen0001": 1}
    plain = tmp_path / "plain.csv"
    plain.write_text("case_id,requested_lesion_volume_ml\ngen0000,2\n")
    assert read_seed_index(plain) is None
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,seed_index\ngen0000,0\ngen0001,one\n")
    with pytest.raises(UserError, match=r"bad.csv: line 3: seed_index='one' is not an integer"):
        read_seed_index(bad)
