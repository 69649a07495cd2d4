"""The segmenter (lesion-aware crops, validation-based selection and early stop, per-class Dice keyed by name) and
the segmentation CLI on a tiny phantom data set: Dice (background excluded), the synthetic/real ratio, the
and the saved segmenter reused as a 3D feature extractor."""
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
from dataset.validate import validate_dataset
from evaluation.evaluate import run as run_evaluate
from evaluation.segmenter import (
    CropSampler,
    Segmenter,
    Volume,
    _lr_factor,
    choose_min_lesion_voxels,
    evaluate_dice,
    load_segmenter,
    predict,
    remove_small_lesions,
    train_segmenter,
)
from evaluation.segmenter_settings import settings_from
from utils.errors import UserError
from utils.paths import CONFIG_DIR




def _cfg(overrides=()):
    """The segmentation config on a 3-class toy data set: tissue and a small 'spot' lesion class."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("segmentation", overrides=[
            "dataset.label_nc=3", "dataset.class_names=[background,tissue,spot]", "dataset.lesion_classes=[spot]",
            "dataset.crop_size=[16,16,8]", "segmenter.network.channels=[4,8]", "segmenter.network.strides=[2]",
            "segmenter.network.num_res_units=0", "segmenter.train.crop_size=null", *overrides])


def _toy(name, seed, spots=True, value=None):
    """A 32x32x16 volume: a tissue block (class 1) holding two bright 2x2x2 spots (class 2); `value`: a constant
    image that tells the volume apart."""
    rng = np.random.default_rng(seed)
    label = np.zeros((32, 32, 16), dtype=np.int64)
    label[4:28, 4:28, 2:14] = 1
    if spots:
        for _ in range(2):
            x, y, z = rng.integers(6, 24), rng.integers(6, 24), rng.integers(3, 11)
            label[x:x + 2, y:y + 2, z:z + 2] = 2
    image = np.array([-1.0, 0.0, 0.8])[label] + rng.normal(0, 0.05, label.shape) if value is None \
        else np.full(label.shape, value)
    return Volume.from_arrays(name, image.astype(np.float32), label)


def test_class_crops_are_centred_on_the_rare_class_of_the_volumes_that_hold_it():
    settings = settings_from(_cfg(["segmenter.train.class_crop_fraction=1.0"]))
    assert settings.crop_classes == [2] and settings.report_order == [2, 1]  # the lesion classes by default
    pool = [_toy("none", 0, spots=False, value=0.1), _toy("spots", 1, value=0.7)]
    sampler = CropSampler(pool, settings, torch.Generator().manual_seed(0))
    crops = [sampler.crop() for _ in range(100)]
    assert all(image.shape == (16, 16, 8) for image, _ in crops)
    assert all(np.all(image == np.float32(0.7)) for image, _ in crops)  # never the volume without spots
    assert all((label == 2).any() for _, label in crops)  # jittered by at most a quarter: the voxel stays inside
    uniform = CropSampler(pool, settings_from(_cfg(["segmenter.train.class_crop_fraction=0.0"])),
                          torch.Generator().manual_seed(0))
    crops = [uniform.crop() for _ in range(200)]
    assert 0.3 < np.mean([np.all(image == np.float32(0.1)) for image, _ in crops]) < 0.7  # either volume
    assert np.mean([(label == 2).any() for _, label in crops]) < 0.5  # anywhere: often no spot at all


def test_class_crops_balance_the_classes():
    settings = settings_from(_cfg(["segmenter.train.class_crop_fraction=1.0",
                                   "segmenter.train.crop_classes=[tissue,spot]"]))
    assert settings.crop_classes == [1, 2]
    tissue_only = CropSampler([_toy("a", 0)], settings_from(_cfg(["segmenter.train.class_crop_fraction=1.0",
                                                                 "segmenter.train.crop_classes=[1]"])),
                              torch.Generator().manual_seed(0))
    balanced = CropSampler([_toy("a", 0)], settings, torch.Generator().manual_seed(0))
    tissue_rate = np.mean([(tissue_only.crop()[1] == 2).any() for _ in range(300)])
    balanced_rate = np.mean([(balanced.crop()[1] == 2).any() for _ in range(300)])
    # half the balanced crops are spot-centred (always holding a spot), half tissue-centred
    assert balanced_rate == pytest.approx(0.5 + 0.5 * tissue_rate, abs=0.08)


def test_cosine_schedule_decays_the_learning_rate_to_zero():
    factor = _lr_factor(settings_from(_cfg(["segmenter.train.max_steps=100", "segmenter.train.lr_schedule=cosine"])))
    assert [factor(s) for s in (0, 50, 100, 150)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    constant = _lr_factor(settings_from(_cfg(["segmenter.train.lr_schedule=constant"])))
    assert {constant(s) for s in (0, 50, 10_000)} == {1.0}


def test_training_keeps_the_best_validation_state_and_stops_after_patience(one_thread):
    train = [_toy(f"t{i}", i) for i in range(3)]
    val = [_toy("v0", 10), _toy("v1", 11, spots=False)]
    cfg = _cfg(["segmenter.train.max_steps=40", "segmenter.validation.every_n_steps=10",
                "segmenter.validation.patience=null", "segmenter.train.lr=0.02",
                "segmenter.inference.min_lesion_voxels=0"])  # Dice as validated: no post-processing
    model = train_segmenter(train, val, cfg, seed=0)
    assert [h["step"] for h in model.history] == [10, 20, 30, 40] and model.steps == 40
    scores = [h["score"] for h in model.history]
    assert len(set(scores)) > 1  # it trains
    best = model.history[int(np.argmax(scores))]
    assert model.best_step == best["step"]
    again = evaluate_dice(model, val)  # the returned weights are those of the best validation
    assert list(again["v0"]) == ["spot", "tissue"]  # keyed by class name, the lesion first
    means = {name: np.nanmean([again[case][name] for case in again]) for name in ("spot", "tissue")}
    assert means == pytest.approx(best["dice"])
    assert best["score"] == pytest.approx(0.5 * means["spot"] + 0.5 * np.mean(list(means.values())))
    frozen = train_segmenter(train, val, _cfg(["segmenter.train.max_steps=100", "segmenter.train.lr=0.0",
                                               "segmenter.validation.every_n_steps=5",
                                               "segmenter.validation.patience=2"]), seed=0)
    assert frozen.steps == 15 and frozen.best_step == 5  # nothing improves after the first validation
    no_val = train_segmenter(train, [], cfg, seed=0)
    assert no_val.steps == 40 and no_val.history == [] and no_val.best_step is None
    assert predict(no_val, val[0].image).shape == val[0].image.shape


class _Oracle(torch.nn.Module):
    """Logits -(x - c)^2 for class c: the argmax is the class whose index the image holds."""

    def __init__(self, label_nc: int):
        super().__init__()
        self.label_nc = label_nc

    def forward(self, x):
        return torch.cat([-(x - c) ** 2 for c in range(self.label_nc)], dim=1)


def _oracle_case(name, label, prediction):
    """A case whose image makes the oracle predict `prediction` (class indices as intensities)."""
    return Volume(name, prediction.astype(np.float32), label)


def test_small_lesion_components_take_the_most_likely_other_class():
    labels = np.zeros((16, 16, 8), dtype=np.int64)
    labels[2:8, 2:8, 1:5] = 2     # a lesion of 144 voxels
    labels[12:14, 12:14, 6] = 2   # a speck of 4
    labels[10, 2, 2] = 2          # a single voxel
    logits = _Oracle(3)(torch.from_numpy(labels.astype(np.float32))[None, None])[0]
    logits[0, 12:14, 12:14, 6] = -0.5  # at the speck, background is more likely than tissue
    assert np.array_equal(remove_small_lesions(logits, [2], 0), labels)
    expected = labels.copy()
    expected[10, 2, 2] = 1  # below 4 voxels: only the single voxel goes, to tissue (the oracle's next class)
    assert np.array_equal(remove_small_lesions(logits, [2], 4), expected)
    out = remove_small_lesions(logits, [2], 5)
    assert (out[2:8, 2:8, 1:5] == 2).all() and (out == 2).sum() == 144  # the large lesion stays
    assert (out[12:14, 12:14, 6] == 0).all() and out[10, 2, 2] == 1     # each to its next most likely class
    assert np.array_equal(remove_small_lesions(logits, [], 100), logits.argmax(0).numpy())  # no lesion class


def test_the_validation_cases_choose_the_lesion_size_floor():
    cfg = _cfg(["segmenter.inference.min_lesion_voxels=[0,4,8,64]"])
    settings = settings_from(cfg)
    model = Segmenter(_Oracle(3), settings, torch.device("cpu"))
    lesion = np.zeros((16, 16, 8), dtype=np.int64)
    lesion[1:15, 1:15, :] = 1
    lesion[2:5, 2:5, 2:5] = 2                        # a true lesion of 27 voxels
    with_speck = lesion.copy()
    with_speck[12:14, 12:14, 6] = 2                  # a false positive of 4 voxels
    clean = np.where(lesion == 2, 1, lesion)         # a lesion-free case
    stray = clean.copy()
    stray[10:12, 10:13, 3] = 2                       # a false positive of 6 voxels
    val = [_oracle_case("a", lesion, with_speck), _oracle_case("b", clean, stray)]
    choose_min_lesion_voxels(model, val)
    scores = model.postprocessing["validation_scores"]
    # 0 and 4 keep both false positives, 64 removes the true lesion too, 8 removes just the false positives
    assert model.min_lesion_voxels == 8 and max(scores, key=scores.get) == "8"
    assert scores["8"] == pytest.approx(1.0) and scores["0"] == scores["4"] < scores["8"]
    assert evaluate_dice(model, val)["a"]["spot"] == 1.0 and np.isnan(evaluate_dice(model, val)["b"]["spot"])
    assert (predict(model, stray) == clean).all()
    tied = Segmenter(_Oracle(3), settings_from(_cfg(["segmenter.inference.min_lesion_voxels=[16,8]"])),
                     torch.device("cpu"))
    choose_min_lesion_voxels(tied, val)
    assert tied.min_lesion_voxels == 8  # 8 and 16 score alike: the smallest
    choose_min_lesion_voxels(tied, [])
    assert tied.min_lesion_voxels == 8 and tied.postprocessing["validation_scores"] is None


@pytest.mark.parametrize("override, message", [
    ("segmenter.train.crop_classes=[cortex]", "crop_classes"),
    ("segmenter.train.class_crop_fraction=1.5", "class_crop_fraction"),
    ("segmenter.validation.every_n_steps=0", "every_n_steps"),
    ("segmenter.train.crop_size=[16,16]", "crop_size"),
    ("segmenter.train.lr_schedule=linear", "lr_schedule"),
    ("segmenter.inference.min_lesion_voxels=[4,-1]", "min_lesion_voxels"),
    ("segmenter.inference.min_lesion_voxels=[]", "min_lesion_voxels"),
])
def test_bad_segmenter_settings_are_user_errors(override, message):
    with pytest.raises(UserError, match=f"segmenter.*{message}"):
        settings_from(_cfg([override]))


def test_segmentation_cli_on_phantoms(tmp_path, monkeypatch, one_thread):
    data = tmp_path / "data"
    write_phantom_dataset(data, n_cases=8, shape=(24, 24, 16), spacing=(2.0, 2.0, 2.0), label_nc=3,
                          modality="ct", seed=3)
    overrides = ["dataset=nifti", f"dataset.root_dir={data}", "dataset.label_nc=3", "dataset.spacing=[2,2,2]",
                 "dataset.crop_size=[16,16,16]", "dataset.split.test_fraction=0.25",
                 f"dataset.cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'out'}",
                 f"synthetic=[{tmp_path / 'syn'},{tmp_path / 'syn_train'}]",
                 "segmenter.train.max_steps=30", "segmenter.train.lr=0.01", "segmenter.validation.every_n_steps=15",
                 "segmenter.network.channels=[8,16]", "segmenter.network.strides=[2]",
                 "segmenter.train.crop_size=null", "segmenter.train.batch_size=2", "device=cpu"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("segmentation", overrides=overrides)
    split = make_split(validate_dataset(cfg.dataset).cases, cfg.dataset.split)
    assert len(split["test"]) == 2 and len(split["train"]) == 5
    rng = np.random.default_rng(0)
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn_train").mkdir()  # samples of other cases' label maps: ignored (evaluation.augmentation's)
    for case in split["test"]:  # a perfect generator: the real image itself
        shutil.copy(data / "images" / f"{case}.nii.gz", tmp_path / "syn" / f"{case}_syn0.nii.gz")
    for case in split["train"] + split["val"]:
        image, affine = load_nifti(data / "images" / f"{case}.nii.gz")
        save_nifti(image + rng.normal(0, 20, image.shape), affine, tmp_path / "syn_train" / f"{case}_syn0.nii.gz")

    trained_on = []
    real_train = segmentation.train_segmenter

    def recording(real, val, cfg, seed, *, synthetic=(), **kwargs):
        assert [v.name for v in val] == split["val"]  # model selection on the validation cases only
        trained_on.append([v.name for v in real] + [v.name for v in synthetic])
        return real_train(real, val, cfg, seed, synthetic=synthetic, **kwargs)

    monkeypatch.setattr(segmentation, "train_segmenter", recording)
    segmentation.run(cfg)

    assert trained_on == [split["train"]]  # one segmenter, on the real training cases only

    report = json.loads((tmp_path / "out" / "segmentation.json").read_text())
    metrics = report["metrics"]
    real, synthetic = metrics["dice_real_test"], metrics["dice_synthetic_test"]
    assert list(real["per_class"]) == ["class_1", "class_2"]  # keyed by class name, background excluded
    assert real["n"] == 2 and synthetic["n"] == 2
    assert 0 <= real["mean"] <= 1 and max(real["per_class"].values()) > 0.5  # it learned something
    training = metrics["training"]
    assert [v["step"] for v in training["validations"]] == [15, 30] and training["steps"] == 30
    # the synthetic test volumes are the real images, so the segmenter's Dice and the ratio are exact
    assert synthetic["mean"] == pytest.approx(real["mean"], abs=1e-12)
    assert metrics["dice_ratio_synthetic_over_real"]["value"] == pytest.approx(1.0, abs=1e-12)
    ratios = metrics["dice_ratio_synthetic_over_real"]["per_class"]
    assert list(ratios) == ["class_1", "class_2"]
    for name, value in real["per_class"].items():  # 0 / 0 is undefined (null)
        assert ratios[name] == (pytest.approx(1.0, abs=1e-12) if value > 0 else None)
    assert report["settings"]["synthetic_ignored"] == sorted(f"{c}_syn0" for c in split["train"] + split["val"])
    assert "augmentation" not in metrics
    with open(tmp_path / "out" / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["experiment"] for r in rows} == {"fidelity"}
    assert "dice_background" not in rows[0] and {"dice_class_1", "dice_class_2", "dice_mean"} <= set(rows[0])
    assert sorted(r["source"] for r in rows) == ["real", "real", "synthetic", "synthetic"]  # sources x cases

    # segmenter_weights=: the saved segmenter evaluates again without training, with the same Dice; generated=:
    # pairs of ddpm.generate's layout, here the real test cases under new names, so their Dice is the real one
    generated = tmp_path / "generated"
    for k, case in enumerate(split["test"]):
        for kind in ("images", "labels"):
            (generated / kind).mkdir(parents=True, exist_ok=True)
            shutil.copy(data / kind / f"{case}.nii.gz", generated / kind / f"gen{k:04d}.nii.gz")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        reuse_cfg = compose("segmentation", overrides=[
            *overrides, f"out={tmp_path / 'again'}", f"segmenter_weights={tmp_path / 'out' / 'segmenter.pt'}",
            f"generated={generated}"])
    segmentation.run(reuse_cfg)
    assert trained_on == [split["train"]]  # nothing trained the second time
    report_again = json.loads((tmp_path / "again" / "segmentation.json").read_text())
    again = report_again["metrics"]
    assert again["dice_real_test"]["per_class"] == real["per_class"]  # with the lesion size floor it chose
    assert again["training"]["postprocessing"]["min_lesion_voxels"] == training["postprocessing"]["min_lesion_voxels"]
    assert report_again["settings"]["n_generated"] == 2 and again["dice_generated"]["n"] == 2
    for name, value in real["per_class"].items():
        assert again["dice_generated"]["per_class"][name] == pytest.approx(value, abs=1e-12)
    assert again["dice_ratio_generated_over_real"]["value"] == pytest.approx(1.0, abs=1e-12)
    (generated / "labels" / "gen0001.nii.gz").rename(generated / "labels" / "other.nii.gz")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        unpaired_cfg = compose("segmentation", overrides=[*reuse_cfg_overrides(overrides, tmp_path),
                                                          f"generated={generated}"])
    with pytest.raises(UserError, match="do not pair: gen0001, other"):
        segmentation.run(unpaired_cfg)
    assert again["training"]["reused"].endswith("segmenter.pt") and not (tmp_path / "again" / "segmenter.pt").exists()
    for extra, message in (("dataset.split.seed=5", "trained on test case"),  # other split: test cases it saw
                           ("dataset.spacing=[3,3,3]", "spacing")):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            bad_cfg = compose("segmentation", overrides=[*reuse_cfg_overrides(overrides, tmp_path), extra])
        with pytest.raises(UserError, match=message):
            segmentation.run(bad_cfg)
        assert not (tmp_path / "bad" / "segmentation.json").exists()

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


def test_missing_or_broken_segmenter_weights_are_one_line_errors(tmp_path):
    cfg = _cfg()
    with pytest.raises(UserError, match="not found") as err:
        load_segmenter(tmp_path / "none.pt", cfg, torch.device("cpu"))
    assert "\n" not in str(err.value)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable segmenter file"):
        load_segmenter(tmp_path / "broken.pt", cfg, torch.device("cpu"))


def reuse_cfg_overrides(overrides, tmp_path):
    return [*overrides, f"out={tmp_path / 'bad'}", f"segmenter_weights={tmp_path / 'out' / 'segmenter.pt'}"]


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
