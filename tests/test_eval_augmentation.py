"""The augmentation study: which cases each regime and arm trains on (pure functions on fake case lists), the
headline class, and one tiny end-to-end run on phantoms (edited maps, the study, its JSON / CSV / PNG) with a
segmenter small enough to train 18 times in seconds."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import evaluation.augmentation as augmentation
import evaluation.edited_maps as edited_maps
from dataset.io import load_nifti, save_nifti
from dataset.phantoms import class_intensity, write_phantom_dataset
from dataset.split import make_split
from dataset.validate import validate_dataset
from evaluation.augmentation_cases import (
    SyntheticScan,
    check_training_set,
    for_regime,
    match_scans,
    regime_subsets,
    training_pool,
)
from evaluation.edited_maps import headline_class
from utils.errors import UserError
from utils.paths import CONFIG_DIR

TRAIN = [f"case{i:02d}" for i in range(20)]
SPLIT = {"train": TRAIN, "val": ["case90"], "test": ["case95", "case96"]}


def scan(name: str, source: str | None) -> SyntheticScan:
    return SyntheticScan(name, Path(f"{name}.nii.gz"), None, source)


def test_regimes_are_nested_deterministic_subsets_of_the_training_split():
    subsets = regime_subsets(TRAIN, [4, 8, "all"], seed=0)
    assert [len(subsets[k]) for k in ("4", "8", "all")] == [4, 8, 20]
    assert set(subsets["4"]) < set(subsets["8"]) < set(subsets["all"]) == set(TRAIN)
    assert regime_subsets(list(reversed(TRAIN)), [4, 8, "all"], seed=0) == subsets  # order of the split: no matter
    assert regime_subsets(TRAIN, [4], seed=1)["4"] != subsets["4"]
    for bad in ([21], [0], [4, 4], ["most"]):
        with pytest.raises(UserError, match="regimes"):
            regime_subsets(TRAIN, bad, seed=0)


def test_a_regime_uses_only_the_synthetic_scans_of_its_own_cases():
    scans = [scan(f"{c}_syn0", c) for c in TRAIN] + [scan("gen7_syn0", None)]
    four = regime_subsets(TRAIN, [4], seed=0)["4"]
    chosen = for_regime(scans, four)
    assert {s.source for s in chosen} == set(four) | {None}  # generated maps come from no case: every regime
    assert len(chosen) == 5


def test_scans_of_test_cases_never_train():
    pool = [scan("case01_syn0", "case01"), scan("case90_syn0", "case90")]
    assert training_pool(pool, SPLIT, "real+syn") == pool[:1]  # a validation case's scan is left out
    with pytest.raises(UserError, match="test cases"):
        training_pool(pool + [scan("case95_edit0_syn0", "case95")], SPLIT, "real+edited")
    check_training_set(TRAIN[:4], pool[:1], SPLIT["test"])
    with pytest.raises(UserError, match="case95"):
        check_training_set(TRAIN[:4] + ["case95"], [], SPLIT["test"])
    with pytest.raises(UserError, match="case96"):
        check_training_set(TRAIN[:4], [scan("case96_syn0", "case96")], SPLIT["test"])


def test_edited_scans_pair_with_their_edited_maps_and_source_cases(tmp_path):
    labels = {"case03_edit0": tmp_path / "case03_edit0.nii.gz", "case03_edit1": tmp_path / "case03_edit1.nii.gz"}
    scans = {"case03_edit1_syn0": tmp_path / "s1.nii.gz", "case03_edit1_syn1": tmp_path / "s2.nii.gz"}
    matched = match_scans(scans, labels, "edited")
    assert [(s.source, s.label) for s in matched] == [("case03", labels["case03_edit1"])] * 2
    assert [s.source for s in match_scans({"case03_syn0": tmp_path / "x.nii.gz"}, None, "syn")] == ["case03"]
    with pytest.raises(UserError, match="no label map"):
        match_scans({"case04_edit0_syn0": tmp_path / "y.nii.gz"}, labels, "edited")
    with pytest.raises(UserError, match="_edit"):
        match_scans({"case03_syn0": tmp_path / "z.nii.gz"}, {"case03": tmp_path / "case03.nii.gz"}, "edited")


def test_generated_scans_pair_with_their_maps_by_stem_and_come_from_no_case(tmp_path):
    maps = {"gen0000": tmp_path / "labels" / "gen0000.nii.gz", "gen0001": tmp_path / "labels" / "gen0001.nii.gz"}
    scans = {"gen0000": tmp_path / "images" / "gen0000.nii.gz", "gen0001_syn2": tmp_path / "x.nii.gz"}
    matched = match_scans(scans, maps, "generated")  # ddpm.generate's images/ + labels/, or <map>_syn<k>
    assert [(s.name, s.label, s.source) for s in matched] == [("gen0000", maps["gen0000"], None),
                                                              ("gen0001_syn2", maps["gen0001"], None)]
    with pytest.raises(UserError, match="_syn"):
        match_scans({"gen0007": tmp_path / "y.nii.gz"}, maps, "generated")


def _classes_cfg(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("augmentation", overrides=["dataset=nifti", "dataset.root_dir=unused", "dataset.label_nc=4",
                                                 *overrides])
    return cfg, ["background", "class_1", "class_2", "class_3"]


def test_the_headline_is_one_of_the_lesion_classes_the_segmenter_favours():
    assert headline_class(*_classes_cfg(["dataset.lesion_classes=[class_3,class_2]"])) == 3
    assert headline_class(*_classes_cfg(["dataset.lesion_classes=[class_3,class_2]", "lesion_class=2"])) == 2
    assert headline_class(*_classes_cfg(["lesion_class=class_1"])) == 1  # no lesion classes: any foreground class
    with pytest.raises(UserError, match="lesion_class: class_1 is not one of dataset.lesion_classes"):
        headline_class(*_classes_cfg(["dataset.lesion_classes=[class_3]", "lesion_class=1"]))
    with pytest.raises(UserError, match="lesion_class"):
        headline_class(*_classes_cfg([]))


def image_of(label: np.ndarray, rng) -> np.ndarray:
    """A 'perfect generator': the phantom's class intensities plus noise."""
    return np.round(class_intensity(3, "ct")[label] + rng.normal(0, 15, label.shape)).astype(np.int16)


def test_study_on_phantoms(tmp_path, monkeypatch, one_thread):
    data = tmp_path / "data"
    write_phantom_dataset(data, n_cases=10, shape=(24, 24, 16), spacing=(2.0, 2.0, 2.0), label_nc=3,
                          modality="ct", seed=3)
    base = ["dataset=nifti", f"dataset.root_dir={data}", "dataset.label_nc=3", "dataset.spacing=[2,2,2]",
            "dataset.crop_size=[16,16,16]", "dataset.split.test_fraction=0.2", "dataset.split.val_fraction=0.1",
            f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.lesion_classes=[class_2]", "device=cpu"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("augmentation", overrides=base)
    split = make_split(validate_dataset(cfg.dataset).cases, cfg.dataset.split)
    assert len(split["test"]) == 2 and len(split["train"]) == 7
    rng = np.random.default_rng(0)
    folders = {name: tmp_path / name for name in ("train_labels", "syn_train", "syn_test", "edited", "syn_edited")}
    for folder in folders.values():
        folder.mkdir()
    for case in split["train"] + split["val"]:  # val: left out of training by the study
        label, affine = load_nifti(data / "labels" / f"{case}.nii.gz")
        save_nifti(image_of(label, rng), affine, folders["syn_train"] / f"{case}_syn0.nii.gz")
    for case in split["train"]:
        shutil.copy(data / "labels" / f"{case}.nii.gz", folders["train_labels"] / f"{case}.nii.gz")
    for case in split["test"]:  # fidelity: the synthetic test scans are the real ones
        shutil.copy(data / "images" / f"{case}.nii.gz", folders["syn_test"] / f"{case}_syn0.nii.gz")

    # edited maps: only from training label maps
    edit = [f"edit.labels={folders['train_labels']}", f"edit.out={folders['edited']}", "edit.per_map=1",
            "edit.host_classes=[0,1]", "edit.forbidden_classes=[]", "edit.radius_mm=[2,4]", "edit.move_mm=[2,6]"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        edit_cfg = compose("augmentation", overrides=base + ["action=edit_maps"] + edit)
    shutil.copy(data / "labels" / f"{split['test'][0]}.nii.gz", folders["train_labels"])
    with pytest.raises(UserError, match="not training case"):
        edited_maps.make_edited_maps(edit_cfg)
    (folders["train_labels"] / f"{split['test'][0]}.nii.gz").unlink()
    edits = edited_maps.make_edited_maps(edit_cfg)
    assert sorted(r["source"] for r in edits["edits"]) == sorted(split["train"]) and not edits["failed"]
    assert {r["op"] for r in edits["edits"]} <= set(edited_maps.EDIT_OPS)
    for record in edits["edits"]:
        edited, affine = load_nifti(folders["edited"] / record["file"])
        original, _ = load_nifti(data / "labels" / f"{record['source']}.nii.gz")
        changed = edited != original
        assert changed.any() and set(np.unique(edited[changed])) | set(np.unique(original[changed])) >= {2}
        save_nifti(image_of(edited, rng), affine, folders["syn_edited"] / f"{record['file'][:-7]}_syn0.nii.gz")

    # a segmenter sized for the phantom (as in test_eval_segmentation): one crop is the whole 24x24x16 volume
    # (so class-centred crops add nothing), 12 steps, validated every 6 on the one validation case
    segmenter = ["segmenter.network.channels=[8,16]", "segmenter.network.strides=[2]",
                 "segmenter.train.crop_size=[24,24,16]", "segmenter.train.batch_size=2",
                 "segmenter.train.max_steps=12", "segmenter.train.lr=0.03", "segmenter.train.lr_schedule=constant",
                 "segmenter.train.class_crop_fraction=0.0", "segmenter.train.crop_classes=[class_1,class_2]",
                 "segmenter.validation.every_n_steps=6", "segmenter.validation.patience=null"]
    overrides = base + segmenter + [
        f"out={tmp_path / 'out'}", f"synthetic.train={folders['syn_train']}",
        f"synthetic.edited_labels={folders['edited']}", f"synthetic.edited={folders['syn_edited']}",
        f"synthetic.test={folders['syn_test']}", "regimes=[4,all]", "bootstrap.samples=200"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("augmentation", overrides=overrides)
    trained = []
    real_train = augmentation.train_segmenter

    def recording(real, val, cfg, seed, **kwargs):
        trained.append(([v.name for v in real], [v.name for v in kwargs["synthetic"]], [v.name for v in val]))
        return real_train(real, val, cfg, seed, **kwargs)

    monkeypatch.setattr(augmentation, "train_segmenter", recording)
    report = augmentation.run(cfg)

    subsets = regime_subsets(split["train"], [4, "all"], 0)
    assert len(trained) == 2 * 3 * 3  # regimes x trained arms x seeds
    for index, (real, synthetic, val) in enumerate(trained):
        regime, arm = ("4", "all")[index // 9], ("real", "real+syn", "real+edited")[index // 3 % 3]
        assert sorted(real) == subsets[regime] and len(real) == (4 if regime == "4" else 7)
        sources = {name.split("_")[0] for name in synthetic}
        assert sources == (set() if arm == "real" else set(subsets[regime]))
        assert all(("_edit" in name) == (arm == "real+edited") for name in synthetic)
        assert not (set(real) | sources | set(val)) & set(split["test"]) and val == split["val"]

    saved = json.loads((tmp_path / "out" / "augmentation.json").read_text())
    assert saved["n_cases"] == 2 and saved["few_cases"] is True and saved["settings"]["headline_class"] == "class_2"
    settings = saved["settings"]
    assert settings["validation"]["cases"] == split["val"] and settings["validation"]["n_cases"] == 1
    assert "full validation split" in settings["validation"]["meaning"]
    assert settings["segmenter"]["crop_size"] == [24, 24, 16] and settings["segmenter"]["max_steps"] == 12
    for regime in saved["regimes"].values():  # two validations each, on the validation case
        for arm in ("real", "real+syn", "real+edited"):
            assert [t["steps"] for t in regime["arms"][arm]["training"]] == [12] * 3
            assert {t["best_step"] for t in regime["arms"][arm]["training"]} <= {6, 12}
    assert list(saved["regimes"]) == ["4", "all"] and saved["regimes"]["4"]["n_real"] == 4
    for regime in saved["regimes"].values():
        arms = regime["arms"]
        assert "synthetic.generated" in arms["real+generated"]["reason"] and arms["real+generated"]["skipped"]
        for arm in ("real", "real+syn", "real+edited"):
            entry = arms[arm]
            assert list(entry["dice"]) == ["class_2", "class_1", "mean_over_classes"]  # lesion first
            assert entry["n_cases"] == 2 and entry["few_cases"] is True
            for stats in entry["dice"].values():
                if stats["mean"] is not None:
                    assert stats["ci"][0] <= stats["mean"] <= stats["ci"][1] and len(stats["per_seed"]) == 3
            assert ("difference" in entry) == (arm != "real")
        assert list(arms["real+syn"]["difference"]) == ["class_2", "class_1", "mean_over_classes"]
        assert arms["real+syn"]["n_synthetic"] == regime["n_real"]  # one scan per real case, none of val
    fidelity = saved["fidelity"]
    for key in ("class_2", "class_1", "mean_over_classes"):  # the synthetic test scans are the real scans
        assert fidelity["dice_synthetic"][key]["mean"] == fidelity["dice_real"][key]["mean"]
        if fidelity["dice_real"][key]["mean"]:
            assert fidelity["ratio"][key]["value"] == pytest.approx(1.0) and fidelity["ratio"][key]["ci"] == [1, 1]
    assert max(fidelity["dice_real"][k]["mean"] for k in ("class_1", "class_2")) > 0.5  # it learned something

    with open(tmp_path / "out" / "augmentation.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3 * 3 + 2 + 3  # regimes x arms x classes, 2 skipped arms, 3 fidelity rows
    assert {"regime", "n_real", "arm", "class", "dice", "ci_low", "ci_high", "difference", "difference_ci_low",
            "difference_ci_high", "n_cases", "few_cases", "ratio"} <= set(rows[0])
    assert (tmp_path / "out" / "augmentation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="overwrite"):  # existing outputs are kept
        augmentation.run(cfg)
    assert report["regimes"]["all"]["cases"] == sorted(split["train"])

    # the same study run one regime at a time merges back into it
    parts = []
    for name, regime in (("part_all", "all"), ("part_4", "4")):
        part = dict(saved, regimes={regime: saved["regimes"][regime]},
                    settings=dict(saved["settings"], regimes=[regime]))
        if regime == "4":
            part["fidelity"] = {"skipped": True, "reason": "needs the 'all' regime and the 'real' arm"}
        parts.append(tmp_path / name / "augmentation.json")
        parts[-1].parent.mkdir()
        parts[-1].write_text(json.dumps(part))
    merge = ["action=merge", f"out={tmp_path / 'merged'}", f"reports=[{parts[0]},{parts[1]}]"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        merge_cfg = compose("augmentation", overrides=base + merge)
    merged = augmentation.merge(merge_cfg)
    assert list(merged["regimes"]) == ["4", "all"] and merged["settings"]["merged_from"] == [str(p) for p in parts]
    assert merged["regimes"] == saved["regimes"] and merged["fidelity"] == saved["fidelity"]
    assert {k: v for k, v in merged["settings"].items() if k != "merged_from"} == saved["settings"]
    with open(tmp_path / "merged" / "augmentation.csv") as handle:
        assert list(csv.DictReader(handle)) == rows
    assert (tmp_path / "merged" / "augmentation.png").exists()
    with pytest.raises(UserError, match="overwrite"):
        augmentation.merge(merge_cfg)
    other = json.loads(parts[1].read_text())
    other["settings"]["seeds"] = [0, 1, 2, 3]
    parts[1].write_text(json.dumps(other))
    with pytest.raises(UserError, match=r"part_4/augmentation.json: settings.seeds is \[0, 1, 2, 3\] but .*\[0, 1, 2\]"):
        augmentation.merge_reports(parts)
    with pytest.raises(UserError, match="regime all is also in"):
        augmentation.merge_reports([parts[0], parts[0]])
    parts[1].write_text("{}")
    with pytest.raises(UserError, match="part_4/augmentation.json: not an augmentation.json"):
        augmentation.merge_reports(parts)
