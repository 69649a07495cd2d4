"""Memorisation audit: an exact copy of a training volume is flagged; header metadata is found but not leaked."""
from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from dataset.io import save_nifti
from dataset.phantoms import phantom_affine, phantom_volume
from evaluation.memorization import run
from utils.errors import UserError
from utils.paths import CONFIG_DIR

SECRET = "Doe^Jane 1970-01-01"


def config(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("memorization", overrides=overrides)


def test_exact_copy_is_flagged_and_metadata_reported(tmp_path):
    affine = phantom_affine((2.0, 2.0, 2.0))
    for i in range(4):
        image, _ = phantom_volume((24, 24, 16), 3, "ct", seed=10 + i)
        save_nifti(image, affine, tmp_path / "train" / f"case{i}.nii.gz")
    (tmp_path / "fake").mkdir()
    shutil.copy(tmp_path / "train" / "case2.nii.gz", tmp_path / "fake" / "copy_syn0.nii.gz")
    new, _ = phantom_volume((24, 24, 16), 3, "ct", seed=99)
    save_nifti(new, affine, tmp_path / "fake" / "new_syn0.nii.gz")
    leaky = nib.Nifti1Image(new.astype(np.float32) + 1, affine)
    leaky.header["descrip"] = SECRET.encode()
    leaky.header["aux_file"] = b"scan.dcm"
    nib.save(leaky, str(tmp_path / "fake" / "leaky_syn0.nii.gz"))

    out = tmp_path / "out"
    run(config([f"train={tmp_path / 'train'}", f"fake={tmp_path / 'fake'}", f"out={out}", "grid=[24,24,16]",
                "threshold=0.95", "device=cpu"]))
    text = (out / "memorization.json").read_text()
    assert SECRET not in text and "scan.dcm" not in text  # field names only, never their content
    results = json.loads(text)["results"]
    assert results["flagged"] == ["copy_syn0"]
    assert results["header_metadata"]["files"] == {"leaky_syn0": ["descrip", "aux_file"]}
    with open(out / "per_case.csv") as handle:
        rows = {row["fake"]: row for row in csv.DictReader(handle)}
    copy = rows["copy_syn0"]
    assert copy["nearest_train_ncc"] == "case2" and float(copy["ncc"]) == pytest.approx(1.0, abs=1e-9)
    assert copy["nearest_train_feature"] == "case2" and float(copy["feature_distance"]) == pytest.approx(0, abs=1e-6)
    assert copy["flagged"] == "True" and float(copy["feature_distance_percentile"]) == 0.0
    assert float(copy["ncc_percentile"]) == 100.0 and copy["generated_from_training_label"] == "False"
    assert float(rows["new_syn0"]["ncc"]) < 0.95 and rows["new_syn0"]["flagged"] == "False"
    assert results["ncc"]["reference_train_nearest_max"] < 0.95  # distinct training volumes stay below
    assert (out / "figures" / "nearest_ncc.png").read_bytes()[:4] == b"\x89PNG"

    auto = tmp_path / "auto"  # threshold=auto: more similar to a training volume than any two training volumes
    run(config([f"train={tmp_path / 'train'}", f"fake={tmp_path / 'fake'}", f"out={auto}", "grid=[24,24,16]",
                "features=segmenter"]))
    results = json.loads((auto / "memorization.json").read_text())["results"]
    assert "copy_syn0" in results["flagged"]
    assert results["ncc"]["threshold"] == pytest.approx(results["ncc"]["reference_train_nearest_max"])
    assert results["feature_distance"]["skipped"] and "segmenter" in results["feature_distance"]["reason"]


def test_refuses_training_folder_as_fake(tmp_path):
    save_nifti(np.ones((8, 8, 4), np.float32), np.eye(4), tmp_path / "train" / "a.nii.gz")
    with pytest.raises(UserError, match="train and fake are the same folder"):
        run(config([f"train={tmp_path / 'train'}", f"fake={tmp_path / 'train'}", f"out={tmp_path / 'out'}"]))


def test_a_volume_no_closer_than_its_own_real_scan_is_explained_by_its_label_map(tmp_path):
    affine = phantom_affine((2.0, 2.0, 2.0))
    train = []
    for i in range(4):
        image, _ = phantom_volume((24, 24, 16), 3, "ct", seed=10 + i)
        save_nifti(image, affine, tmp_path / "train" / f"case{i}.nii.gz")
        train.append(image)
    rng = np.random.default_rng(0)
    noisy = [t + rng.normal(0, 0.2 * t.std(), t.shape) for t in train]
    # a: the synthetic volume is a training copy while the real scan of its map is only close: memorisation
    save_nifti(train[2], affine, tmp_path / "fake" / "a_syn0.nii.gz")
    save_nifti(noisy[2], affine, tmp_path / "real" / "a.nii.gz")
    # b: the real scan of its map is itself a training scan and the synthetic one is no closer: the map's anatomy
    save_nifti(noisy[1], affine, tmp_path / "fake" / "b_syn0.nii.gz")
    save_nifti(train[1], affine, tmp_path / "real" / "b.nii.gz")
    common = [f"train={tmp_path / 'train'}", f"fake={tmp_path / 'fake'}", "grid=[24,24,16]", "threshold=0.9",
              "device=cpu"]
    alone = run(config([*common, f"out={tmp_path / 'alone'}"]))["results"]
    assert alone["flagged"] == ["a_syn0", "b_syn0"] and alone["explained_by_label_map"] == []
    results = run(config([*common, f"out={tmp_path / 'out'}", f"real={tmp_path / 'real'}"]))["results"]
    assert results["flagged"] == ["a_syn0"] and results["explained_by_label_map"] == ["b_syn0"]
    with open(tmp_path / "out" / "per_case.csv") as handle:
        rows = {row["fake"]: row for row in csv.DictReader(handle)}
    assert float(rows["b_syn0"]["real_scan_ncc"]) == pytest.approx(1.0, abs=1e-9)
    assert float(rows["a_syn0"]["ncc"]) == pytest.approx(1.0, abs=1e-9)
    assert 0.9 <= float(rows["a_syn0"]["real_scan_ncc"]) < 0.999  # close, but the synthetic volume is closer
