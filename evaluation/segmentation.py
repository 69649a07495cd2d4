"""python -m evaluation.segmentation dataset=<name> [synthetic=DIR] [out=DIR]

Mask fidelity: a segmenter (`evaluation.segmenter`) trained on the real training cases of the patient split and
selected on the validation cases is applied to the real test cases and to synthetic volumes generated from the
same test label maps; Dice per class keyed by class name (background excluded, the lesion classes first), their
means, and the ratios synthetic / real. The test split never trains anything and never selects a model. Whether
synthetic scans help a segmenter (real only vs real + synthetic arms, low-data regimes, seeds, intervals) is
`evaluation.augmentation`. With `generated=DIR` (the output of `ddpm.generate`: images/ + labels/, maps that come
from no case), the same segmenter is scored on the generated pairs against their own maps, and the ratio to the
real test cases' Dice says whether scans of new anatomies are as segmentable as real ones.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from dataset.cache import load_preprocessed
from dataset.split import make_split, read_split, select
from dataset.validate import validate_dataset
from evaluation.pairing import list_nifti, source_stem
from evaluation.report import print_summary, skipped, write_csv, write_json
from evaluation.segmenter import (
    Volume,
    evaluate_dice,
    load_segmenter,
    mean_per_class,
    preprocess_pair,
    preprocess_synthetic,
    save_segmenter,
    train_segmenter,
)
from utils.atomic import check_writable
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)


def load_split(cfg, cases) -> dict[str, list[str]]:
    """The generator's split file if given, else the split training computes (same function, same seed)."""
    split = read_split(cfg.split_file) if cfg.split_file is not None else make_split(cases, cfg.dataset.split)
    known = {case.case_id for case in cases}
    unknown = sorted(set().union(*split.values()) - known)
    if unknown:
        raise UserError(f"{cfg.split_file}: cases not in the data set: {', '.join(unknown[:5])}")
    if set(split["train"]) & set(split["test"]):
        raise UserError(f"{cfg.split_file}: a case is in both train and test")
    if not split["test"]:
        raise UserError("dataset.split: the test split is empty; set dataset.split.test_fraction > 0")
    return split


def list_synthetic(folders) -> dict[str, Path]:
    """stem -> path over one folder or a list of folders (e.g. samples of the test and of the training label maps);
    a stem found in two folders is an error, not a silent choice."""
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    files: dict[str, Path] = {}
    for folder in folders:
        for stem, path in list_nifti(folder, "synthetic").items():
            if stem in files:
                raise UserError(f"{path}: synthetic stem '{stem}' is also in {files[stem].parent}")
            files[stem] = path
    return dict(sorted(files.items()))


def synthetic_volumes(folders, cases_by_id: dict, preprocessed: dict, split: dict, dataset_cfg) -> dict:
    """Synthetic volumes of test cases: {"test": [...], "ignored": [stems of other cases]}."""
    groups = {"test": [], "ignored": []}
    files = list_synthetic(folders)
    split_of = {case_id: name for name, ids in split.items() for case_id in ids}
    for stem, path in tqdm(files.items(), desc="synthetic volumes", unit="file"):
        source = source_stem(stem, cases_by_id)
        if source is None or split_of.get(source) != "test":
            groups["ignored"].append(stem)
            continue
        case = preprocessed[source]
        groups["test"].append(
            preprocess_synthetic(path, np.asarray(case.label), case.grid_info.original_shape, dataset_cfg))
    return groups


def generated_volumes(folder, dataset_cfg) -> list:
    """The pairs of a `ddpm.generate` output folder (layout images_labels): scan and map share a stem."""
    root = Path(folder)
    images = list_nifti(root / "images", "generated scan")
    labels = list_nifti(root / "labels", "generated label map")
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        raise UserError(f"{root}: images/ and labels/ do not pair: {', '.join(unpaired[:3])} only in one of them")
    return [preprocess_pair(images[stem], labels[stem], dataset_cfg)
            for stem in tqdm(images, desc="generated pairs", unit="pair")]


def ratios(other: dict, real: dict, meaning: str) -> dict:
    """Mean and per-class Dice ratio of a summary to the real test cases' summary."""
    return {"value": ratio(other["mean"], real["mean"]),
            "per_class": {name: ratio(other["per_class"][name], value) for name, value in real["per_class"].items()},
            "meaning": meaning}


def case_mean(dice: dict) -> float:
    """Mean over the classes defined in one case (NaN if none)."""
    values = [v for v in dice.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summarise_dice(per_case: dict) -> dict:
    """Per class (keyed by name, lesion first) the mean over the cases where it is defined; `mean` over classes."""
    per_class = mean_per_class(per_case)
    means = [case_mean(dice) for dice in per_case.values()]
    return {"mean": case_mean(per_class), "per_class": per_class,
            "mean_of_case_means": float(np.nanmean(means)) if per_case else float("nan"), "n": len(per_case)}


def ratio(synthetic: float, real: float) -> float:
    return synthetic / real if real > 0 and not math.isnan(synthetic) else float("nan")


def reused_segmenter(cfg, split: dict, device):
    """The segmenter of `segmenter_weights`, refused if it was trained on a case of this test split."""
    model = load_segmenter(cfg.segmenter_weights, cfg, device)
    if model.train_cases is None:
        log.warning("%s does not list its training cases: cannot check that it never saw a test case",
                    cfg.segmenter_weights)
    else:
        leaked = sorted(set(model.train_cases) & set(split["test"]))
        if leaked:
            raise UserError(f"{cfg.segmenter_weights}: the segmenter was trained on test case(s) "
                            f"{', '.join(leaked[:5])} of this split")
    return model


def training_record(model) -> dict:
    return {"steps": model.steps, "best_step": model.best_step, "seconds": round(model.seconds, 1),
            "validations": model.history,
            "postprocessing": {"min_lesion_voxels": model.min_lesion_voxels, **model.postprocessing}}


def run(cfg: DictConfig) -> dict:
    out = Path(cfg.out)
    reuse = cfg.segmenter_weights is not None
    names = ("segmentation.json", "per_case.csv") + (() if reuse else ("segmenter.pt",))
    outputs = {name: out / name for name in names}
    for path in outputs.values():
        check_writable(path, cfg.overwrite)
    device = resolve_device(cfg.device)
    cases = validate_dataset(cfg.dataset).cases  # every bad-input check, as training does
    split = load_split(cfg, cases)
    cases_by_id = {case.case_id: case for case in cases}
    used = {case.case_id: load_preprocessed(case, cfg.dataset) for case in tqdm(
        [c for name in ("train", "val", "test") for c in select(cases, split, name)], desc="real cases")}
    real = {name: [Volume.from_arrays(c, used[c].image, used[c].label) for c in split[name]]
            for name in ("train", "val", "test")}
    synthetic = {"test": [], "ignored": []}
    if cfg.synthetic is not None:
        synthetic = synthetic_volumes(cfg.synthetic, cases_by_id, used, split, cfg.dataset)
    generated = [] if cfg.generated is None else generated_volumes(cfg.generated, cfg.dataset)

    rows = []
    if reuse:
        model = reused_segmenter(cfg, split, device)
    else:
        log.info("training the segmenter on %d real cases, validating on %d (at most %s steps)",
                 len(real["train"]), len(real["val"]), cfg.segmenter.train.max_steps)
        model = train_segmenter(real["train"], real["val"], cfg, int(cfg.seed), device=device)
        save_segmenter(model, outputs["segmenter.pt"], dataset_cfg=cfg.dataset, overwrite=cfg.overwrite,
                       train_cases=split["train"])
    real_results = evaluate_dice(model, real["test"])
    rows += case_rows("fidelity", "real", int(cfg.seed), real_results)
    results = {"dice_real_test": summarise_dice(real_results), "training": training_record(model)}
    if reuse:
        results["training"]["reused"] = str(cfg.segmenter_weights)
    if synthetic["test"]:
        results["dice_synthetic_test"], results["dice_ratio_synthetic_over_real"], scored = score_against_real(
            model, synthetic["test"], "synthetic", int(cfg.seed), results["dice_real_test"],
            "mean Dice on synthetic volumes / mean Dice on the real volumes of the same test label maps")
        rows += scored
    else:
        results["dice_synthetic_test"] = skipped(
            "no synthetic volumes of test cases; pass synthetic=DIR holding <test case>_syn<k>.nii.gz")
    if generated:
        results["dice_generated"], results["dice_ratio_generated_over_real"], scored = score_against_real(
            model, generated, "generated", int(cfg.seed), results["dice_real_test"],
            "mean Dice on generated pairs (against their own maps) / mean Dice on the real test cases")
        rows += scored

    report = {"settings": run_settings(cfg, model.settings, real, synthetic, generated, device), "metrics": results}
    write_json(report, outputs["segmentation.json"], cfg.overwrite)
    write_csv(rows, outputs["per_case.csv"], cfg.overwrite)
    print_summary(f"segmentation -> {out}", console_lines(results))
    return report


def run_settings(cfg, settings, real: dict, synthetic: dict, generated: list, device) -> dict:
    """The `settings` block of segmentation.json: what was run, and how the figures are defined."""
    return {
        "dataset": str(cfg.dataset.name), "n_train": len(real["train"]), "n_val": len(real["val"]),
        "n_test": len(real["test"]), "n_synthetic_test": len(synthetic["test"]), "n_generated": len(generated),
        "synthetic_ignored": synthetic["ignored"],
        "segmenter": settings.network, "crop_size": settings.crop_size, "max_steps": settings.max_steps,
        "batch_size": settings.batch_size, "lr": settings.lr, "seed": int(cfg.seed), "device": str(device),
        "dice": "per class keyed by name, background (0) excluded, lesion classes first; mean over the classes "
                "present",
        "split": "patient-level; test cases never used for training or model selection",
    }


def score_against_real(model, volumes: list[Volume], source: str, seed: int, real_dice: dict,
                       meaning: str) -> tuple[dict, dict, list[dict]]:
    """Dice of `volumes` against their own maps, its ratio to the real test Dice `real_dice`, and the per-case
    rows."""
    per_case = evaluate_dice(model, volumes)
    summary = summarise_dice(per_case)
    return summary, ratios(summary, real_dice, meaning), case_rows("fidelity", source, seed, per_case)


def case_rows(experiment: str, source: str, seed: int, per_case: dict) -> list[dict]:
    return [{"experiment": experiment, "source": source, "seed": seed, "case": case,
             **{f"dice_{name}": value for name, value in dice.items()}, "dice_mean": case_mean(dice)}
            for case, dice in per_case.items()]


def console_lines(results: dict) -> dict:
    real = results["dice_real_test"]
    lines = {f"dice real test, {name}": {"value": value} for name, value in real["per_class"].items()}
    lines["dice real test, mean"] = {"value": real["mean"]}
    training = results["training"]
    lines["segmenter training"] = {"value": f"{training['steps']} steps (best {training['best_step']}), "
                                            f"{training['seconds']:.0f} s"}
    syn = results["dice_synthetic_test"]
    lines["dice synthetic test"] = syn if syn.get("skipped") else {"value": syn["mean"]}
    if "dice_ratio_synthetic_over_real" in results:
        lines["ratio synthetic/real"] = {"value": results["dice_ratio_synthetic_over_real"]["value"]}
    if "dice_generated" in results:
        lines["dice generated pairs"] = {"value": results["dice_generated"]["mean"]}
        lines["ratio generated/real"] = {"value": results["dice_ratio_generated_over_real"]["value"]}
    return lines


@hydra.main(version_base="1.3", config_path="../config", config_name="segmentation")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
