"""Pairing synthetic with real volumes by stem, and refusing to compare a set with itself."""
from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from evaluation.pairing import nifti_stem, pair_folders, source_stem
from utils.errors import UserError


def write(path, seed=0, shape=(8, 8, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_stems_and_sources():
    assert nifti_stem("a/case_01.nii.gz") == "case_01"
    assert nifti_stem("case.nii") == "case"
    real = {"case1", "case1_syn", "p_2"}
    assert source_stem("case1", real) == "case1"
    assert source_stem("case1_syn3", real) == "case1"
    assert source_stem("case1_syn", real) == "case1_syn"  # exact name wins
    assert source_stem("p_2_syn10", real) == "p_2"
    assert source_stem("case2_syn0", real) is None
    assert source_stem("case1_synA", real) is None


def test_pair_folders(tmp_path):
    for i, name in enumerate(["a", "b", "c_0000"]):
        write(tmp_path / "real" / f"{name}.nii.gz", seed=i)
    write(tmp_path / "labels" / "a.nii.gz", 10)
    write(tmp_path / "labels" / "b.nii", 11)
    write(tmp_path / "labels" / "c.nii.gz", 12)  # nnU-Net: image c_0000 pairs with label c
    for i, name in enumerate(["a", "b_syn0", "b_syn1", "orphan_syn0"]):
        write(tmp_path / "fake" / f"{name}.nii.gz", seed=20 + i)
    (tmp_path / "fake" / "notes.txt").write_text("ignored")
    pairing = pair_folders(tmp_path / "real", tmp_path / "fake", tmp_path / "labels")
    assert pairing.pairs == [("a", "a"), ("b", "b_syn0"), ("b", "b_syn1")]
    assert pairing.unpaired_fake == ["orphan_syn0"]
    assert pairing.samples_by_source() == {"a": ["a"], "b": ["b_syn0", "b_syn1"]}
    assert pairing.labels["c_0000"].name == "c.nii.gz"


def test_missing_label_and_empty_folder(tmp_path):
    write(tmp_path / "real" / "a.nii.gz")
    write(tmp_path / "fake" / "a_syn0.nii.gz", seed=1)
    write(tmp_path / "labels" / "z.nii.gz")
    with pytest.raises(UserError, match="no label map for real volume 'a'"):
        pair_folders(tmp_path / "real", tmp_path / "fake", tmp_path / "labels")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .nii"):
        pair_folders(tmp_path / "real", tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        pair_folders(tmp_path / "real", tmp_path / "missing")


def test_refuses_same_folder(tmp_path):
    write(tmp_path / "real" / "a.nii.gz")
    with pytest.raises(UserError, match="same folder"):
        pair_folders(tmp_path / "real", tmp_path / "real")
    with pytest.raises(UserError, match="same folder"):
        pair_folders(tmp_path / "real", tmp_path / "real" / ".." / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UserError, match="same folder"):
        pair_folders(tmp_path / "real", tmp_path / "link")


def test_refuses_byte_identical_file_sets(tmp_path):
    write(tmp_path / "real" / "a.nii.gz", 0)
    write(tmp_path / "real" / "b.nii.gz", 1)
    (tmp_path / "fake").mkdir()
    shutil.copy(tmp_path / "real" / "a.nii.gz", tmp_path / "fake" / "a_syn0.nii.gz")
    shutil.copy(tmp_path / "real" / "b.nii.gz", tmp_path / "fake" / "b_syn0.nii.gz")
    with pytest.raises(UserError, match="byte-identical"):
        pair_folders(tmp_path / "real", tmp_path / "fake")
    write(tmp_path / "fake" / "b_syn0.nii.gz", 5)  # one file differs: allowed
    assert len(pair_folders(tmp_path / "real", tmp_path / "fake").pairs) == 2
