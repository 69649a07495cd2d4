"""python -m evaluation.segmentation dataset=<name> [synthetic=DIR] [out=DIR]

Mask fidelity: a segmenter trained on the real training cases of the patient split is applied to the real test
cases and to synthetic volumes generated from the same test label maps; Dice per class (background excluded),
their means, and the headline ratio synthetic / real. Augmentation: segmenters trained on real only vs real +
synthetic (generated from training label maps) for several seeds, Dice on the real test cases with bootstrap
confidence intervals over test cases. The test split never trains anything.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from dataset.cache import load_preprocessed
from dataset.checks import validate_dataset
from dataset.split import make_split, read_split, select
from evaluation.features import resolve_device
from evaluation.metrics import mean_dice
from evaluation.pairing import list_nifti, source_stem
from evaluation.report import print_summary, skipped, write_csv, write_json
from evaluation.segmenter import (
    Volume,
    dice_on,
    network_settings,
    preprocess_synthetic,
    save_segmenter,
    train_segmenter,
)
from utils.atomic import check_writable
from utils.errors import UserError, exit_on_user_error


def bootstrap_ci(values, *, samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling cases with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


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
    """Synthetic files grouped by the split of their source case: {"test": [...], "train": [...]} (val ignored)."""
    groups = {"train": [], "test": [], "ignored": []}
    files = list_synthetic(folders)
    split_of = {case_id: name for name, ids in split.items() for case_id in ids}
    for stem, path in tqdm(files.items(), desc="synthetic volumes", unit="file"):
        source = source_stem(stem, cases_by_id)
        if source is None or split_of.get(source) not in ("train", "test"):
            groups["ignored"].append(stem)
            continue
        case = preprocessed[source]
        groups[split_of[source]].append(
            preprocess_synthetic(path, np.asarray(case.label), case.grid_info.original_shape, dataset_cfg))
    return groups


def summarise_dice(results: list[dict], label_nc: int) -> dict:
    per_class = {}
    for cls in range(1, label_nc):
        values = [r["dice"][cls] for r in results if not math.isnan(r["dice"][cls])]
        per_class[str(cls)] = float(np.mean(values)) if values else float("nan")
    means = [mean_dice(r["dice"]) for r in results]
    return {"mean": mean_dice({int(k): v for k, v in per_class.items()}), "per_class": per_class,
            "mean_of_case_means": float(np.nanmean(means)) if results else float("nan"), "n": len(results)}


def run(cfg: DictConfig) -> dict:
    out = Path(cfg.out)
    outputs = {name: out / name for name in ("segmentation.json", "per_case.csv", "segmenter.pt")}
    for path in outputs.values():
        check_writable(path, cfg.overwrite)
    device = resolve_device(cfg.device)
    label_nc = int(cfg.dataset.label_nc)
    crop_size = [int(c) for c in (cfg.train.crop_size or cfg.dataset.crop_size)]
    network = network_settings(cfg.segmenter, label_nc)
    cases = validate_dataset(cfg.dataset).cases  # every bad-input check, as training does
    split = load_split(cfg, cases)
    cases_by_id = {case.case_id: case for case in cases}
    used = {case.case_id: load_preprocessed(case, cfg.dataset)
            for case in tqdm(select(cases, split, "train") + select(cases, split, "test"), desc="real cases")}
    train_real = [Volume.from_arrays(c, used[c].image, used[c].label) for c in split["train"]]
    test_real = [Volume.from_arrays(c, used[c].image, used[c].label) for c in split["test"]]
    synthetic = {"train": [], "test": [], "ignored": []}
    if cfg.synthetic is not None:
        synthetic = synthetic_volumes(cfg.synthetic, cases_by_id, used, split, cfg.dataset)

    def train(arm: str, seed: int):
        return train_segmenter(train_real, synthetic["train"] if arm == "real+synthetic" else [], network=network,
                               steps=cfg.train.steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                               crop_size=crop_size, foreground_prob=float(cfg.dataset.foreground_crop_prob),
                               synthetic_per_real=float(cfg.augmentation.synthetic_per_real), seed=seed,
                               device=device)

    def dice(net, volumes):
        return dice_on(net, volumes, label_nc=label_nc, crop_size=crop_size, overlap=cfg.inference.overlap,
                       device=device)

    rows = []
    print(f"training the segmenter on {len(train_real)} real cases ({cfg.train.steps} steps)")
    net = train("real", cfg.train.seed)
    save_segmenter(net, outputs["segmenter.pt"], network=network, dataset_cfg=cfg.dataset, crop_size=crop_size,
                   overwrite=cfg.overwrite, train_cases=split["train"])
    real_results = dice(net, test_real)
    rows += [case_row("fidelity", "real", cfg.train.seed, r) for r in real_results]
    results = {"dice_real_test": summarise_dice(real_results, label_nc)}
    if synthetic["test"]:
        syn_results = dice(net, synthetic["test"])
        rows += [case_row("fidelity", "synthetic", cfg.train.seed, r) for r in syn_results]
        results["dice_synthetic_test"] = summarise_dice(syn_results, label_nc)
        real_mean = results["dice_real_test"]["mean"]
        results["dice_ratio_synthetic_over_real"] = {
            "value": results["dice_synthetic_test"]["mean"] / real_mean if real_mean > 0 else float("nan"),
            "meaning": "mean Dice on synthetic volumes / mean Dice on the real volumes of the same test label maps",
        }
    else:
        results["dice_synthetic_test"] = skipped(
            "no synthetic volumes of test cases; pass synthetic=DIR holding <test case>_syn<k>.nii.gz")
    results["augmentation"] = augmentation(cfg, train, dice, net, test_real, synthetic, rows, label_nc)

    report = {
        "settings": {
            "dataset": str(cfg.dataset.name), "n_train": len(train_real), "n_test": len(test_real),
            "n_synthetic_test": len(synthetic["test"]), "n_synthetic_train": len(synthetic["train"]),
            "synthetic_ignored": synthetic["ignored"], "segmenter": network, "crop_size": crop_size,
            "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
            "seed": cfg.train.seed, "device": str(device),
            "dice": "per class, background (0) excluded; mean over classes present",
            "split": "patient-level; test cases never used for training",
        },
        "metrics": results,
    }
    write_json(report, outputs["segmentation.json"], cfg.overwrite)
    write_csv(rows, outputs["per_case.csv"], cfg.overwrite)
    print_summary(f"segmentation -> {out}", console_lines(results))
    return report


def case_row(experiment: str, source: str, seed: int, result: dict) -> dict:
    row = {"experiment": experiment, "source": source, "seed": seed, "case": result["name"]}
    row.update({f"dice_{cls}": value for cls, value in result["dice"].items()})
    row["dice_mean"] = mean_dice(result["dice"])
    return row


def augmentation(cfg, train, dice, seed_net, test_real, synthetic, rows, label_nc) -> dict:
    if not cfg.augmentation.enabled:
        return skipped("augmentation.enabled=false")
    if not synthetic["train"]:
        return skipped("no synthetic volumes of training cases; pass synthetic=DIR holding "
                       "<training case>_syn<k>.nii.gz generated from training label maps")
    per_arm = {}
    for arm in ("real", "real+synthetic"):
        case_means = []
        for seed in tqdm(list(cfg.augmentation.seeds), desc=f"augmentation: {arm}", unit="seed"):
            net = seed_net if (arm == "real" and seed == cfg.train.seed) else train(arm, seed)
            results = dice(net, test_real)
            rows += [case_row("augmentation", arm, seed, r) for r in results]
            case_means.append([mean_dice(r["dice"]) for r in results])
        per_arm[arm] = np.nanmean(np.asarray(case_means, dtype=np.float64), axis=0)  # per test case, over seeds
    boot = dict(samples=int(cfg.bootstrap.samples), confidence=float(cfg.bootstrap.confidence),
                seed=int(cfg.bootstrap.seed))
    out = {arm: {"mean_dice": float(np.mean(v)), "ci": bootstrap_ci(v, **boot)} for arm, v in per_arm.items()}
    difference = per_arm["real+synthetic"] - per_arm["real"]
    out["difference"] = {"mean_dice": float(np.mean(difference)), "ci": bootstrap_ci(difference, **boot),
                         "meaning": "real+synthetic minus real only, paired by test case"}
    out["settings"] = {"seeds": list(cfg.augmentation.seeds), "synthetic_per_real": cfg.augmentation.synthetic_per_real,
                       "n_test_cases": len(test_real), **boot, "ci": "percentile bootstrap over test cases"}
    return out


def console_lines(results: dict) -> dict:
    lines = {"dice real test": {"value": results["dice_real_test"]["mean"]}}
    syn = results["dice_synthetic_test"]
    lines["dice synthetic test"] = syn if syn.get("skipped") else {"value": syn["mean"]}
    if "dice_ratio_synthetic_over_real" in results:
        lines["ratio synthetic/real"] = {"value": results["dice_ratio_synthetic_over_real"]["value"]}
    aug = results["augmentation"]
    if aug.get("skipped"):
        lines["augmentation"] = aug
    else:
        for arm in ("real", "real+synthetic", "difference"):
            low, high = aug[arm]["ci"]
            lines[f"augmentation {arm}"] = {"value": f"{aug[arm]['mean_dice']:.4f} [{low:.4f}, {high:.4f}]"}
    return lines


@hydra.main(version_base="1.3", config_path="../config", config_name="segmentation")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
