import json

import pytest

from dataset.layout import Case, find_cases
from dataset.phantoms import write_phantom_dataset
from dataset.split import make_split, read_split, split_sizes, write_split
from utils.errors import UserError

TINY = dict(shape=(8, 8, 6), spacing=(1.0, 1.0, 1.0))


def _cfg(compose_cfg, root, *overrides):
    return compose_cfg("check", ["dataset=nifti", f"dataset.root_dir={root}", "dataset.label_nc=3",
                                 *overrides]).dataset


def test_images_labels_layout_pairs_by_name_with_mixed_suffixes(tmp_path, compose_cfg):
    write_phantom_dataset(tmp_path, case_ids=["b", "a"], **TINY)
    write_phantom_dataset(tmp_path, case_ids=["c"], suffix=".nii", **TINY)
    cases = find_cases(_cfg(compose_cfg, tmp_path))
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    assert cases[2].image_path.name == "c.nii" and cases[0].label_path == tmp_path / "labels" / "a.nii.gz"
    (tmp_path / "images" / ".DS_Store").write_text("ignored")
    assert len(find_cases(_cfg(compose_cfg, tmp_path))) == 3


@pytest.mark.parametrize("channel", [0, 1])
def test_nnunet_layout_selects_the_image_channel(tmp_path, compose_cfg, channel):
    write_phantom_dataset(tmp_path, layout="nnunet", case_ids=["pat_001", "pat_002"], n_channels=2, **TINY)
    cases = find_cases(_cfg(compose_cfg, tmp_path, "dataset.layout=nnunet", f"dataset.image_channel={channel}"))
    assert [c.case_id for c in cases] == ["pat_001", "pat_002"]
    assert cases[0].image_path.name == f"pat_001_{channel:04d}.nii.gz"
    assert cases[0].label_path.name == "pat_001.nii.gz"
    with pytest.raises(UserError, match="no _0002 image"):
        find_cases(_cfg(compose_cfg, tmp_path, "dataset.layout=nnunet", "dataset.image_channel=2"))


def test_nnunet_image_without_channel_suffix_is_named(tmp_path, compose_cfg):
    write_phantom_dataset(tmp_path, layout="nnunet", case_ids=["x"], **TINY)
    (tmp_path / "imagesTr" / "x_0000.nii.gz").rename(tmp_path / "imagesTr" / "x.nii.gz")
    with pytest.raises(UserError, match=r"imagesTr/x.nii.gz: nnU-Net image name must end in a channel suffix"):
        find_cases(_cfg(compose_cfg, tmp_path, "dataset.layout=nnunet"))


def test_patient_id_from_pattern_and_mismatch_names_the_case(tmp_path, compose_cfg):
    write_phantom_dataset(tmp_path, case_ids=["PAT01_scan1", "PAT01_scan2", "PAT02_scan1"], **TINY)
    cases = find_cases(_cfg(compose_cfg, tmp_path, "dataset.patient_id_pattern='^(PAT\\d+)_'"))
    assert [c.patient_id for c in cases] == ["PAT01", "PAT01", "PAT02"]
    write_phantom_dataset(tmp_path, case_ids=["other"], **TINY)
    with pytest.raises(UserError, match=r"images/other.nii.gz: case name 'other' does not match"):
        find_cases(_cfg(compose_cfg, tmp_path, "dataset.patient_id_pattern='^(PAT\\d+)_'"))


def _cases(n_patients, per_patient=1):
    return [Case(f"p{p:02d}_s{s}", None, None, f"p{p:02d}") for p in range(n_patients) for s in range(per_patient)]


@pytest.mark.parametrize("n_patients", [1, 2, 3, 5, 24, 101])
def test_split_is_patient_level_complete_and_deterministic(n_patients):
    cases = _cases(n_patients, per_patient=3)
    cfg = {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0}
    split = make_split(cases, cfg)
    assert split == make_split(list(reversed(cases)), cfg)  # order of discovery does not matter
    assert sorted(sum(split.values(), [])) == sorted(c.case_id for c in cases)
    patients = {name: {c.split("_")[0] for c in ids} for name, ids in split.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert len(patients["train"]) >= 1
    if n_patients >= 3:
        assert len(patients["val"]) >= 1 and len(patients["test"]) >= 1
    if n_patients == 24:
        assert [len(patients[k]) for k in ("train", "val", "test")] == [16, 4, 4]


def test_split_depends_on_seed_and_validates_fractions():
    cases = _cases(40)
    a = make_split(cases, {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0})
    b = make_split(cases, {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 1})
    assert a != b and len(a["val"]) == len(b["val"]) == 8
    with pytest.raises(UserError, match="sum below 1"):
        make_split(cases, {"val_fraction": 0.6, "test_fraction": 0.4, "seed": 0})
    assert split_sizes(3, 0.0, 0.0) == (2, 1, 0)


def test_write_split_is_atomic_and_refuses_a_different_split(tmp_path):
    split = {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    path = write_split(split, tmp_path / "run")
    assert json.loads(path.read_text()) == split and read_split(path) == split
    assert write_split(split, tmp_path / "run") == path  # same split: kept
    with pytest.raises(UserError, match="different split"):
        write_split({"train": ["a"], "val": ["b", "c"], "test": ["d"]}, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["split.json"]
