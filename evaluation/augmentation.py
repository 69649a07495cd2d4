"""The augmentation study: does synthetic data improve a segmenter trained on few real cases?

    python -m evaluation.augmentation action=edit_maps edit.labels=DIR edit.out=DIR split_file=SPLIT.json
    python -m evaluation.augmentation dataset=<name> split_file=SPLIT.json synthetic.train=DIR \
        synthetic.edited_labels=DIR synthetic.edited=DIR synthetic.test=DIR [out=DIR]

`action=edit_maps` writes `edit.per_map` edited copies `<case>_edit<j>.nii.gz` of every training label map in
`edit.labels` (one random lesion insert, move, grow or shrink each, through `dataset.edit_labels` with its
anatomical checks); `python -m ddpm.sample` then synthesises their scans.

`action=study`: low-data regimes (the segmenter trained on `regimes` real training cases: nested subsets of the
training split drawn with `subset_seed`, or `all`) times arms:
- `real`: the regime's real cases only (the reference);
- `real+syn`: plus scans synthesised from those cases' own label maps (`synthetic.train`: `<case>_syn<k>`);
- `real+edited`: plus scans synthesised from edited copies of those cases' label maps (`synthetic.edited_labels`:
  `<case>_edit<j>`, `synthetic.edited`: `<case>_edit<j>_syn<k>`);
- `real+generated`: plus pairs of the label-map generator (`python -m ddpm.generate ... out=DIR`:
  `synthetic.generated_labels=DIR/labels`, `synthetic.generated=DIR/images`, a scan named as its map or
  `<map>_syn<k>`); skipped with a reason when not given.
A regime uses only the synthetic scans whose label maps come from its own real cases. Every arm is trained with
each of `seeds` (`evaluation.segmenter`, settings: the `segmenter` group, config/segmenter/default.yaml), each
segmenter selecting its weights on the whole validation split, whatever its regime; all are scored on the real
test cases (the test split trains nothing; synthetic scans of test or validation cases are never training data),
per class, the lesion class first, with a paired case bootstrap (`evaluation.stats`) and the difference to
`real`. The headline (lesion) class is one of `dataset.lesion_classes` when the data set names any, the classes
the segmenter's crops and model selection favour. Mask fidelity: the all-real segmenters on the synthetic scans
of the test label maps (`synthetic.test`, as `evaluation.segmentation` pairs them) vs the real test scans, ratio
synthetic / real per class.
Writes `augmentation.json`, `augmentation.csv` and `augmentation.png` (lesion Dice vs number of real cases).
`action=merge reports=[A/augmentation.json,B/augmentation.json] out=DIR` joins studies of the same settings run
one regime (or a few) at a time, e.g. one Slurm job per regime.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dataset.cache import load_preprocessed
from dataset.validate import class_names, validate_dataset
from evaluation.augmentation_cases import (ALL, SyntheticScan, check_training_set, for_regime, match_scans,
                                           regime_subsets, training_pool)
from evaluation.augmentation_report import MEAN_KEY, OUTPUTS, merge_reports, write_outputs
from evaluation.edited_maps import headline_class, make_edited_maps
from evaluation.pairing import list_nifti, nifti_stem, source_stem
from evaluation.report import skipped
from evaluation.segmentation import case_mean, list_synthetic, load_split, synthetic_volumes
from evaluation.segmenter import Volume, evaluate_dice, preprocess_pair, preprocess_synthetic, train_segmenter
from evaluation.segmenter_settings import settings_from
from evaluation.stats import paired_bootstrap
from utils.atomic import check_writable
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error

ARMS = ("real", "real+syn", "real+edited", "real+generated")
REFERENCE = "real"
MIN_SEEDS = 3


# classes ------------------------------------------------------------------------------------------------------
def class_order(names: list[str], lesion: int) -> list[int]:
    return [lesion] + [c for c in range(1, len(names)) if c != lesion]


# the study ----------------------------------------------------------------------------------------------------
def check_study_settings(cfg) -> None:
    arms = [str(a) for a in cfg.arms]
    if REFERENCE not in arms or len(set(arms)) != len(arms) or set(arms) - set(ARMS):
        raise UserError(f"arms: {arms}: expected distinct arms of {', '.join(ARMS)}, including '{REFERENCE}'")
    seeds = [int(s) for s in cfg.seeds]
    if len(set(seeds)) < MIN_SEEDS:
        raise UserError(f"seeds: {seeds}: the study needs at least {MIN_SEEDS} distinct seeds per arm")


def synthetic_pools(cfg, split) -> tuple[dict[str, list[SyntheticScan]], dict[str, str]]:
    """{arm: training scans} for the arms that have them, and {arm: reason} for those skipped."""
    syn = cfg.synthetic
    pools, reasons = {}, {}
    sources = {
        "real+syn": (syn.train, None, "syn", "synthetic.train=DIR of <training case>_syn<k>.nii.gz"),
        "real+edited": (syn.edited, syn.edited_labels, "edited",
                        "synthetic.edited_labels=DIR (action=edit_maps) and synthetic.edited=DIR of their scans"),
        "real+generated": (syn.generated, syn.generated_labels, "generated",
                           "synthetic.generated_labels=DIR/labels and synthetic.generated=DIR/images of "
                           "python -m ddpm.generate out=DIR"),
    }
    for arm in [str(a) for a in cfg.arms if str(a) != REFERENCE]:
        scans, labels, kind, needed = sources[arm]
        if scans is None or (kind != "syn" and labels is None):
            reasons[arm] = f"no synthetic scans given; pass {needed}"
        else:
            maps = None if labels is None else list_nifti(labels, f"{arm} label map")
            pools[arm] = training_pool(match_scans(list_synthetic(scans), maps, kind), split, arm)
    return pools, reasons


class VolumeStore:
    """Real cases and synthetic training scans on the model grid, loaded once when first needed."""

    def __init__(self, cases_by_id: dict, dataset_cfg):
        self.cases_by_id, self.dataset_cfg = cases_by_id, dataset_cfg
        self.real: dict[str, tuple] = {}
        self.volumes: dict[str, Volume] = {}

    def preprocessed(self, case_id: str):
        if case_id not in self.real:
            self.real[case_id] = load_preprocessed(self.cases_by_id[case_id], self.dataset_cfg)
        return self.real[case_id]

    def case(self, case_id: str) -> Volume:
        key = f"real:{case_id}"
        if key not in self.volumes:
            case = self.preprocessed(case_id)
            self.volumes[key] = Volume.from_arrays(case_id, case.image, case.label)
        return self.volumes[key]

    def scan(self, item: SyntheticScan) -> Volume:
        key = f"{item.scan}"
        if key not in self.volumes:
            if item.label is None:
                case = self.preprocessed(item.source)
                self.volumes[key] = preprocess_synthetic(item.scan, np.asarray(case.label),
                                                         case.grid_info.original_shape, self.dataset_cfg)
            else:
                self.volumes[key] = preprocess_pair(item.scan, item.label, self.dataset_cfg)
        return self.volumes[key]


def scores(per_volume: dict[str, dict[str, float]], keys: list[str]) -> dict[str, np.ndarray]:
    """{class name: Dice per volume} (in the volumes' order) and the mean over the classes present per volume."""
    values = list(per_volume.values())
    out = {key: np.array([v[key] for v in values], dtype=np.float64) for key in keys if key != MEAN_KEY}
    out[MEAN_KEY] = np.array([case_mean(v) for v in values], dtype=np.float64)
    return out


def per_case(values: np.ndarray, sources: list[str], case_ids: list[str]) -> np.ndarray:
    """Mean (NaN-aware) over the volumes of each case, in `case_ids` order; NaN for a case without a volume."""
    out = np.full(len(case_ids), np.nan)
    for index, case_id in enumerate(case_ids):
        mine = values[[i for i, source in enumerate(sources) if source == case_id]]
        if (~np.isnan(mine)).any():
            out[index] = np.nanmean(mine)
    return out


def run(cfg: DictConfig) -> dict:
    check_study_settings(cfg)
    out = Path(cfg.out)
    for name in OUTPUTS:
        check_writable(out / name, cfg.overwrite)
    names = class_names(cfg.dataset)
    if MEAN_KEY in names:
        raise UserError(f"dataset.class_names: '{MEAN_KEY}' is reserved for the mean over classes")
    lesion = names[headline_class(cfg, names)]
    keys = [names[c] for c in class_order(names, names.index(lesion))] + [MEAN_KEY]
    segmenter_settings = settings_from(cfg)  # checked before anything trains
    device = resolve_device(cfg.device)
    cases = validate_dataset(cfg.dataset).cases
    split = load_split(cfg, cases)
    subsets = regime_subsets(split["train"], list(cfg.regimes), int(cfg.subset_seed))
    pools, reasons = synthetic_pools(cfg, split)
    store = VolumeStore({case.case_id: case for case in cases}, cfg.dataset)
    test_ids = list(split["test"])
    test_real = [store.case(c) for c in tqdm(test_ids, desc="real test cases")]
    val_real = [store.case(c) for c in tqdm(split["val"], desc="real validation cases")]
    test_synthetic = {"test": [], "ignored": []} if cfg.synthetic.test is None else synthetic_volumes(
        cfg.synthetic.test, store.cases_by_id, {c: store.preprocessed(c) for c in test_ids}, split, cfg.dataset)
    test_sources = [source_stem(nifti_stem(volume.name), test_ids) for volume in test_synthetic["test"]]

    regimes, fidelity_scores = {}, {"real": [], "synthetic": []}
    for regime, real_ids in subsets.items():
        arms_scores, entries = {}, {}
        for arm in [str(a) for a in cfg.arms]:
            if arm in reasons:
                entries[arm] = skipped(reasons[arm])
                continue
            scans = for_regime(pools[arm], real_ids) if arm != REFERENCE else []
            if arm != REFERENCE and not scans:
                entries[arm] = skipped(f"no {arm} scans come from the {len(real_ids)} real cases of this regime")
                continue
            check_training_set(real_ids, scans, test_ids)
            fidelity_test = test_synthetic["test"] if regime == ALL and arm == REFERENCE else []
            arms_scores[arm], entries[arm] = train_arm(
                cfg, f"regime {regime}: {arm}", [store.case(c) for c in real_ids], [store.scan(s) for s in scans],
                val_real, test_real, keys, device, fidelity_test, fidelity_scores)
            entries[arm]["synthetic_sources"] = len({s.source for s in scans})
        add_statistics(entries, arms_scores, keys, cfg.bootstrap)
        regimes[regime] = {"n_real": len(real_ids), "cases": real_ids, "arms": entries}

    report = {
        "settings": study_settings(cfg, split, keys, list(subsets), segmenter_settings, device,
                                   test_synthetic["ignored"]),
        "n_cases": len(test_ids),
        "few_cases": len(test_ids) < int(cfg.bootstrap.min_cases),
        "regimes": regimes,
        "fidelity": fidelity(fidelity_scores, test_ids, test_sources, keys, cfg),
    }
    write_outputs(report, out, cfg.overwrite)
    return report


def merge(cfg: DictConfig) -> dict:
    """action=merge: one augmentation.json / .csv / .png from studies run a regime (or a few) at a time."""
    if not cfg.reports:
        raise UserError("action=merge: set reports=[A/augmentation.json,B/augmentation.json,...]")
    out = Path(cfg.out)
    for name in OUTPUTS:
        check_writable(out / name, cfg.overwrite)
    report = merge_reports(list(cfg.reports))
    write_outputs(report, out, cfg.overwrite)
    return report


def train_arm(cfg, what: str, real: list[Volume], synthetic: list[Volume], val_real: list[Volume],
              test_real: list[Volume], keys: list[str], device, fidelity_test: list[Volume],
              fidelity_scores: dict[str, list]) -> tuple[list[dict], dict]:
    """One segmenter per seed on `real` (+ `synthetic`) scans, scored on the real test cases: the per-seed
    scores and the arm's entry. With `fidelity_test` (the all-real reference) each segmenter also scores the
    synthetic scans of the test label maps, appended to `fidelity_scores`."""
    seeds = [int(s) for s in cfg.seeds]
    per_seed, training = [], []
    for seed in tqdm(seeds, desc=what, unit="seed"):
        model = train_segmenter(real, val_real, cfg, seed, synthetic=synthetic,
                                synthetic_per_real=float(cfg.synthetic_per_real), device=device)
        training.append({"seed": seed, "steps": model.steps, "best_step": model.best_step, "seconds": model.seconds})
        per_seed.append(scores(evaluate_dice(model, test_real), keys))
        if fidelity_test:
            fidelity_scores["real"].append(per_seed[-1])
            fidelity_scores["synthetic"].append(scores(evaluate_dice(model, fidelity_test), keys))
    return per_seed, {"n_real": len(real), "n_synthetic": len(synthetic), "seeds": seeds, "training": training}


def study_settings(cfg, split: dict[str, list[str]], keys: list[str], regimes: list[str], segmenter_settings,
                   device, synthetic_test_ignored: list) -> dict:
    """The `settings` block of augmentation.json: what was run, and how the figures are defined."""
    return {
        "dataset": str(cfg.dataset.name), "n_train": len(split["train"]), "n_val": len(split["val"]),
        "n_test": len(split["test"]), "headline_class": keys[0], "classes": keys, "regimes": regimes,
        "arms": [str(a) for a in cfg.arms], "seeds": [int(s) for s in cfg.seeds], "subset_seed": int(cfg.subset_seed),
        "synthetic_per_real": float(cfg.synthetic_per_real),
        "segmenter": asdict(segmenter_settings), "device": str(device),
        "bootstrap": OmegaConf.to_container(cfg.bootstrap, resolve=True),
        "dice": "per class on the real test cases, background excluded; mean over seeds within a case, then "
                f"over cases; {MEAN_KEY}: per case the mean over the classes present",
        "ci": "paired percentile bootstrap over test cases (seeds averaged within each drawn case)",
        "split": "patient-level; the test split trains nothing",
        "validation": validation_note(split["val"]),
        "synthetic_test_ignored": synthetic_test_ignored,
    }


def validation_note(val_ids: list[str]) -> dict:
    if not val_ids:
        return {"n_cases": 0, "meaning": "no validation cases: every segmenter keeps its last state"}
    return {"n_cases": len(val_ids), "cases": list(val_ids),
            "meaning": "every segmenter (each regime, arm and seed) keeps the weights of its best score on the full "
                       "validation split of real cases, whatever the number of real training cases of its regime; "
                       "the validation cases train nothing and their synthetic scans are left out"}


def stacked(per_seed: list[dict], key: str) -> np.ndarray:
    return np.stack([s[key] for s in per_seed])  # (seeds, cases)


def add_statistics(entries: dict, arms_scores: dict, keys: list[str], boot) -> None:
    """Per class (lesion first, then the others, then the mean over classes): Dice with its interval, and the
    difference to the real-only arm, into each trained arm's entry."""
    if REFERENCE not in arms_scores:
        return
    for key in keys:
        out = paired_bootstrap({arm: stacked(s, key) for arm, s in arms_scores.items()}, REFERENCE,
                               samples=int(boot.samples), confidence=float(boot.confidence), seed=int(boot.seed),
                               min_cases=int(boot.min_cases))
        for arm, stats in out.items():
            difference = stats.pop("difference", None)
            entries[arm].setdefault("dice", {})[key] = stats
            if difference is not None:
                entries[arm].setdefault("difference", {})[key] = difference
    for arm in arms_scores:
        n_cases = stacked(arms_scores[arm], keys[0]).shape[1]
        entries[arm].update(n_cases=n_cases, few_cases=n_cases < int(boot.min_cases),
                            n_cases_headline=entries[arm]["dice"][keys[0]]["n_cases"])


def fidelity(scored: dict, test_ids: list[str], synthetic_sources: list[str], keys: list[str], cfg) -> dict:
    """Dice of the all-real segmenters on synthetic test scans vs real test scans, and their ratio, per class."""
    if not scored["synthetic"]:
        reason = ("no synthetic scans of test cases; pass synthetic.test=DIR of <test case>_syn<k>.nii.gz"
                  if not synthetic_sources else f"needs the '{ALL}' regime and the '{REFERENCE}' arm")
        return skipped(reason)
    boot = cfg.bootstrap
    out = {"n_synthetic": len(synthetic_sources), "dice_real": {}, "dice_synthetic": {}, "ratio": {},
           "meaning": "Dice of the segmenters trained on all real training cases (each seed), on the synthetic "
                      "scans of the test label maps / on the real test scans; per case the mean over its samples"}
    for key in keys:
        real = np.stack([s[key] for s in scored["real"]])
        synthetic = np.stack([per_case(s[key], synthetic_sources, test_ids) for s in scored["synthetic"]])
        stats = paired_bootstrap({"real": real, "synthetic": synthetic}, "real", samples=int(boot.samples),
                                 confidence=float(boot.confidence), seed=int(boot.seed),
                                 min_cases=int(boot.min_cases), ratio=True)
        out["dice_real"][key] = stats["real"]
        out["ratio"][key] = stats["synthetic"].pop("ratio")
        stats["synthetic"].pop("difference")
        out["dice_synthetic"][key] = stats["synthetic"]
    return out


@hydra.main(version_base="1.3", config_path="../config", config_name="augmentation")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    if cfg.action == "edit_maps":
        make_edited_maps(cfg)
    elif cfg.action == "study":
        run(cfg)
    elif cfg.action == "merge":
        merge(cfg)
    else:
        raise UserError(f"action={cfg.action}: expected study, edit_maps or merge")


if __name__ == "__main__":
    main()
