"""Segmentation CLI on a tiny phantom data set: Dice (background excluded), the synthetic/real ratio, the
augmentation experiment with bootstrap intervals, and the saved segmenter reused as a 3D feature extractor."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import evaluation.segmentation as segmentation
from dataset.io import load_nifti, save_nifti
from dataset.phantoms import write_phantom_dataset
from dataset.split import make_split
from dataset.checks import validate_dataset
from evaluation.evaluate import run as run_evaluate
from evaluation.segmentation import bootstrap_ci
from utils.errors import UserError
from utils.paths import CONFIG_DIR


@pytest.fixture
def one_thread():
    """Tiny networks run faster on one thread than on two contended ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_bootstrap_interval():
    values = np.array([0.5, 0.6, 0.7, 0.8])
    low, high = bootstrap_ci(values, samples=2000, confidence=0.95, seed=0)
    assert low < values.mean() < high and 0.5 <= low and high <= 0.8
    assert bootstrap_ci(np.full(5, 0.3), samples=100, confidence=0.9, seed=0) == (pytest.approx(0.3),) * 2


def test_segmentation_cli_on_phantoms(tmp_path, monkeypatch, one_thread):
    data = tmp_path / "data"
    write_phantom_dataset(data, n_cases=8, shape=(24, 24, 16), spacing=(2.0, 2.0, 2.0), label_nc=3,
                          modality="ct", seed=3)
    overrides = ["dataset=nifti", f"dataset.root_dir={data}", "dataset.label_nc=3", "dataset.spacing=[2,2,2]",
                 "dataset.crop_size=[16,16,16]", "dataset.split.test_fraction=0.25",
                 f"dataset.cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'out'}",
                 f"synthetic=[{tmp_path / 'syn'},{tmp_path / 'syn_train'}]",
                 "train.steps=25", "train.lr=0.01", "augmentation.seeds=[0,1]", "bootstrap.samples=200",
                 "device=cpu"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("segmentation", overrides=overrides)
    split = make_split(validate_dataset(cfg.dataset).cases, cfg.dataset.split)
    assert len(split["test"]) == 2 and len(split["train"]) == 5
    rng = np.random.default_rng(0)
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn_train").mkdir()  # samples of the training label maps in their own folder, as in demo.sh
    for case in split["test"]:  # a perfect generator: the real image itself
        shutil.copy(data / "images" / f"{case}.nii.gz", tmp_path / "syn" / f"{case}_syn0.nii.gz")
    for case in split["train"] + split["val"]:
        image, affine = load_nifti(data / "images" / f"{case}.nii.gz")
        save_nifti(image + rng.normal(0, 20, image.shape), affine, tmp_path / "syn_train" / f"{case}_syn0.nii.gz")

    trained_on = []
    real_train = segmentation.train_segmenter

    def recording(real, synthetic, **kwargs):
        trained_on.append([v.name for v in real] + [v.name for v in synthetic])
        return real_train(real, synthetic, **kwargs)

    monkeypatch.setattr(segmentation, "train_segmenter", recording)
    segmentation.run(cfg)

    # 1 fidelity model (reused as seed 0 of the real-only arm) + real seed 1 + real+synthetic seeds 0 and 1
    assert len(trained_on) == 4
    for names in trained_on:
        assert not any(name.split("_syn")[0].removesuffix(".nii.gz") in split["test"] for name in names)
    assert any(name.endswith("_syn0.nii.gz") for name in trained_on[-1])

    report = json.loads((tmp_path / "out" / "segmentation.json").read_text())
    metrics = report["metrics"]
    real, synthetic = metrics["dice_real_test"], metrics["dice_synthetic_test"]
    assert set(real["per_class"]) == {"1", "2"}  # background excluded
    assert real["n"] == 2 and synthetic["n"] == 2
    assert 0 <= real["mean"] <= 1 and max(real["per_class"].values()) > 0.5  # it learned something
    # the synthetic test volumes are the real images, so the segmenter's Dice and the ratio are exact
    assert synthetic["mean"] == pytest.approx(real["mean"], abs=1e-12)
    assert metrics["dice_ratio_synthetic_over_real"]["value"] == pytest.approx(1.0, abs=1e-12)
    assert report["settings"]["synthetic_ignored"] == [f"{c}_syn0" for c in split["val"]]
    augmentation = metrics["augmentation"]
    for arm in ("real", "real+synthetic", "difference"):
        low, high = augmentation[arm]["ci"]
        assert low <= augmentation[arm]["mean_dice"] <= high
    with open(tmp_path / "out" / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["experiment"] for r in rows} == {"fidelity", "augmentation"}
    assert "dice_0" not in rows[0] and {"dice_1", "dice_2", "dice_mean"} <= set(rows[0])
    assert len([r for r in rows if r["experiment"] == "augmentation"]) == 2 * 2 * 2  # arms x seeds x cases

    # the segmenter trained on real data is a 3D feature extractor that needs no download
    out = tmp_path / "eval"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        eval_cfg = compose("evaluate", overrides=[
            f"real={data / 'images'}", f"fake={tmp_path / 'syn'}", f"out={out}", "data_range=2000",
            "metrics=[fid_3d_segmenter,mmd_3d_segmenter]", f"segmenter.weights={tmp_path / 'out' / 'segmenter.pt'}",
            "device=cpu"])
    run_evaluate(eval_cfg)
    results = json.loads((out / "metrics.json").read_text())["metrics"]
    assert results["fid_3d_segmenter"]["value"] >= 0 and results["fid_3d_segmenter"]["n_real"] == 8
    assert "segmenter" in results["fid_3d_segmenter"]["settings"]["network"]
    assert np.isfinite(results["mmd_3d_segmenter"]["value"])


def test_synthetic_folders_merge_and_refuse_a_repeated_stem(tmp_path):
    for folder, stems in (("a", ["c1_syn0", "c2_syn0"]), ("b", ["c3_syn0"])):
        (tmp_path / folder).mkdir()
        for stem in stems:
            (tmp_path / folder / f"{stem}.nii.gz").write_bytes(b"")
    files = segmentation.list_synthetic([tmp_path / "a", str(tmp_path / "b")])
    assert list(files) == ["c1_syn0", "c2_syn0", "c3_syn0"] and files["c3_syn0"].parent == tmp_path / "b"
    assert list(segmentation.list_synthetic(tmp_path / "a")) == ["c1_syn0", "c2_syn0"]
    (tmp_path / "b" / "c1_syn0.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="c1_syn0"):
        segmentation.list_synthetic([tmp_path / "a", tmp_path / "b"])
