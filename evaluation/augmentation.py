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
"""
from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage
from tqdm import tqdm

from dataset.attributes import lesion_classes
from dataset.cache import load_preprocessed
from dataset.edit_labels import EditOptions, as_label_array, edit_label_file, edit_label_map
from dataset.io import load_nifti
from dataset.validate import class_names, validate_dataset
from evaluation import figures
from evaluation.pairing import SYNTHETIC_STEM, list_nifti, nifti_stem, source_stem
from evaluation.report import print_summary, skipped, write_csv, write_json
from evaluation.segmentation import case_mean, list_synthetic, load_split, synthetic_volumes
from evaluation.segmenter import (Volume, evaluate_dice, preprocess_pair, preprocess_synthetic, settings_from,
                                  train_segmenter)
from evaluation.stats import paired_bootstrap
from utils.atomic import check_writable
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)

ARMS = ("real", "real+syn", "real+edited", "real+generated")
REFERENCE = "real"
ALL = "all"
MIN_SEEDS = 3
MEAN_KEY = "mean_over_classes"
EDITED_STEM = re.compile(r"^(?P<source>.+)_edit(?P<index>\d+)$")
EDIT_OPS = ("insert", "move", "grow", "shrink")
OUTPUTS = ("augmentation.json", "augmentation.csv", "augmentation.png")


# case selection (pure functions of case ids and file names) -------------------------------------------------
def regime_subsets(train_ids: Sequence[str], regimes: Sequence, seed: int) -> dict[str, list[str]]:
    """{regime: sorted case ids}: the first n of one seeded permutation of the training cases, so the subsets
    are nested; `all` is every training case."""
    ordered = sorted(train_ids)
    order = [ordered[i] for i in np.random.default_rng(int(seed)).permutation(len(ordered))]
    subsets: dict[str, list[str]] = {}
    for regime in regimes:
        if str(regime) == ALL:
            n = len(ordered)
        elif isinstance(regime, (int, np.integer)) and not isinstance(regime, bool) and 1 <= regime <= len(ordered):
            n = int(regime)
        else:
            raise UserError(f"regimes: {regime!r} must be '{ALL}' or a number of cases in 1..{len(ordered)} "
                            "(the training split)")
        if str(regime) in subsets:
            raise UserError(f"regimes: {regime!r} is listed twice")
        subsets[str(regime)] = sorted(order[:n])
    return subsets


def edited_source(stem: str) -> str | None:
    """The case an edited label map `<case>_edit<j>` was made from."""
    match = EDITED_STEM.match(stem)
    return match["source"] if match else None


@dataclass(frozen=True)
class SyntheticScan:
    name: str                # the scan's stem
    scan: Path
    label: Path | None       # its label map; None: the real label map of `source`
    source: str | None       # the real case its label map comes from; None: a generated label map


def match_scans(scans: dict[str, Path], labels: dict[str, Path] | None, kind: str) -> list[SyntheticScan]:
    """Pair scans `<map>_syn<k>` with their label maps. kind "syn": the map is the real case's own
    (`labels` None); "edited": `<case>_edit<j>` maps; "generated": maps that come from no case, the scan also
    named as its map (`ddpm.generate`'s images/ and labels/)."""
    out = []
    for stem, path in scans.items():
        match = SYNTHETIC_STEM.match(stem)
        if match is None and not (kind == "generated" and stem in labels):
            raise UserError(f"{path}: a synthetic scan must be named <label map>_syn<k>.nii.gz"
                            + (" or as its label map" if kind == "generated" else ""))
        if labels is None:
            out.append(SyntheticScan(stem, path, None, match["source"]))
            continue
        map_stem = source_stem(stem, labels)
        if map_stem is None:
            raise UserError(f"{path}: no label map {match['source']}.nii.gz in {next(iter(labels.values())).parent}")
        source = edited_source(map_stem) if kind == "edited" else None
        if kind == "edited" and source is None:
            raise UserError(f"{labels[map_stem]}: an edited label map must be named <case>_edit<j>.nii.gz")
        out.append(SyntheticScan(stem, path, labels[map_stem], source))
    return out


def training_pool(scans: list[SyntheticScan], split: dict[str, list[str]], what: str) -> list[SyntheticScan]:
    """The scans allowed to train: from training cases (or generated maps). A scan whose map comes from a test
    case is an error; those of validation or unknown cases are left out with a note."""
    train, test = set(split["train"]), set(split["test"])
    leaked = [s.name for s in scans if s.source in test]
    if leaked:
        raise UserError(f"{what}: {len(leaked)} scan(s) come from test cases ({', '.join(leaked[:3])}); "
                        "the test split trains nothing")
    kept = [s for s in scans if s.source is None or s.source in train]
    left_out = sorted(s.name for s in scans if s not in kept)
    if left_out:
        log.info("%s: %d scan(s) of non-training cases left out (%s)", what, len(left_out), ", ".join(left_out[:3]))
    return kept


def for_regime(scans: list[SyntheticScan], cases: Sequence[str]) -> list[SyntheticScan]:
    """The scans whose label maps come from the regime's real cases (generated maps: every regime)."""
    allowed = set(cases)
    return [s for s in scans if s.source is None or s.source in allowed]


def check_training_set(real_ids: Sequence[str], scans: Sequence[SyntheticScan], test_ids: Sequence[str]) -> None:
    """Last guard before training: nothing from the test split."""
    test = set(test_ids)
    used = set(real_ids) | {s.source for s in scans if s.source is not None}
    if used & test:
        raise UserError(f"augmentation: a training set holds test case(s) {sorted(used & test)[:3]}")


# classes ------------------------------------------------------------------------------------------------------
def resolve_class(entry, names: list[str], key: str, *, allow_background: bool = False) -> int:
    """A class given by name (of dataset.class_names) or by index."""
    low = 0 if allow_background else 1
    if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool) and low <= entry < len(names):
        return int(entry)
    if isinstance(entry, str) and entry in names[low:]:
        return names.index(entry)
    raise UserError(f"{key}: {entry!r} is not a class of the data set ({', '.join(names[low:])}, or an index)")


def headline_class(cfg, names: list[str]) -> int:
    """`lesion_class`, else the first of `dataset.lesion_classes`; with lesion classes it must be one of them
    (the segmenter centres its class crops on them and selects its weights on their Dice)."""
    classes = lesion_classes(cfg.dataset)
    if cfg.lesion_class is None:
        if not classes:
            raise UserError("lesion_class: set it (a class name or index), or dataset.lesion_classes")
        return next(iter(classes.values()))
    lesion = resolve_class(cfg.lesion_class, names, "lesion_class")
    if classes and lesion not in classes.values():
        raise UserError(f"lesion_class: {names[lesion]} is not one of dataset.lesion_classes ({', '.join(classes)}),"
                        " the classes the segmenter's crops and model selection favour; make it one")
    return lesion


def class_order(names: list[str], lesion: int) -> list[int]:
    return [lesion] + [c for c in range(1, len(names)) if c != lesion]


# edited label maps --------------------------------------------------------------------------------------------
def random_edit(labels: np.ndarray, affine: np.ndarray, lesion: int, *, rng: np.random.Generator, edit_cfg,
                options: EditOptions, source: str):
    """(op, dataset.edit_labels op, its arguments, options, result) of one random edit that changes the map and
    passes the anatomical checks, within `edit.attempts` draws; None if none did. A map without a lesion can
    only get an insert."""
    ops = [str(op) for op in edit_cfg.ops]
    if not (labels == lesion).any():
        ops = [op for op in ops if op == "insert"]
    if not ops:
        return None
    hosts = np.argwhere(np.isin(labels, list(options.host_classes)))
    _, n_lesions = ndimage.label(labels == lesion, structure=np.ones((3, 3, 3)))
    for _ in range(int(edit_cfg.attempts)):
        op = ops[rng.integers(len(ops))]
        edit_options = replace(options, component=int(rng.integers(max(n_lesions, 1))))
        if op == "insert":
            if not len(hosts):
                return None
            args = {"radius_mm": float(rng.uniform(*edit_cfg.radius_mm)),
                    "center_vox": [int(v) for v in hosts[rng.integers(len(hosts))]], "shape": str(edit_cfg.shape),
                    "seed": int(rng.integers(1 << 31))}
        elif op == "move":
            direction = rng.normal(size=3)
            args = {"offset_mm": (direction / np.linalg.norm(direction) * rng.uniform(*edit_cfg.move_mm)).tolist()}
        else:
            args = {"factor": float(rng.uniform(*(edit_cfg.grow if op == "grow" else edit_cfg.shrink)))}
        name = "scale" if op in ("grow", "shrink") else op
        try:
            result = edit_label_map(labels, affine, name, lesion, options=edit_options, source=source, **args)
        except UserError:
            continue
        if result.changed_voxels:
            return op, name, args, edit_options, result
    return None


def check_edit_settings(edit_cfg) -> None:
    unknown = [op for op in edit_cfg.ops if op not in EDIT_OPS]
    if unknown or not edit_cfg.ops:
        raise UserError(f"edit.ops: {list(edit_cfg.ops)}: expected some of {', '.join(EDIT_OPS)}")
    for key, low in (("radius_mm", 0.0), ("move_mm", 0.0), ("grow", 1.0), ("shrink", 0.0)):
        values = [float(v) for v in edit_cfg[key]]
        if len(values) != 2 or not low < values[0] <= values[1] or (key == "shrink" and values[1] >= 1.0):
            raise UserError(f"edit.{key}={values}: expected [min, max] with {low:g} < min <= max"
                            + (" < 1" if key == "shrink" else ""))
    if int(edit_cfg.per_map) < 1 or int(edit_cfg.attempts) < 1:
        raise UserError("edit.per_map and edit.attempts: expected positive integers")


def make_edited_maps(cfg: DictConfig) -> dict:
    """`edit.per_map` edited copies of every training label map in `edit.labels`, into `edit.out`."""
    edit_cfg = cfg.edit
    if edit_cfg.labels is None or edit_cfg.out is None:
        raise UserError("edit.labels and edit.out: required with action=edit_maps (training label maps in, "
                        "edited maps out)")
    check_edit_settings(edit_cfg)
    names = class_names(cfg.dataset)
    lesion = headline_class(cfg, names)
    options = EditOptions(
        host_classes=[resolve_class(c, names, "edit.host_classes", allow_background=True)
                      for c in edit_cfg.host_classes],
        forbidden_classes=[resolve_class(c, names, "edit.forbidden_classes", allow_background=True)
                           for c in edit_cfg.forbidden_classes],
        min_inside_fraction=float(edit_cfg.min_inside_fraction), label_nc=len(names))
    maps = list_nifti(edit_cfg.labels, "label map")
    split = load_split(cfg, validate_dataset(cfg.dataset).cases)
    not_train = [stem for stem in maps if stem not in set(split["train"])]
    if not_train:
        raise UserError(f"{edit_cfg.labels}: {', '.join(not_train[:3])} not training case(s) of the split; only "
                        "training label maps are edited (python -m train.export_split split=train)")
    out = Path(edit_cfg.out)
    planned = {(stem, j): out / f"{stem}_edit{j}.nii.gz" for stem in maps for j in range(int(edit_cfg.per_map))}
    for path in [*planned.values(), out / "edits.json"]:
        check_writable(path, cfg.overwrite)
    records, failed = [], []
    for (stem, j), path in tqdm(planned.items(), desc="edited label maps", unit="map"):
        labels, affine = load_nifti(maps[stem])
        labels = as_label_array(labels, str(maps[stem]))
        rng = np.random.default_rng([int(edit_cfg.seed), zlib.crc32(stem.encode()), j])
        found = random_edit(labels, affine, lesion, rng=rng, edit_cfg=edit_cfg, options=options,
                            source=str(maps[stem]))
        if found is None:
            failed.append(path.name)
            continue
        op, name, args, edit_options, _ = found
        result = edit_label_file(maps[stem], path, name, lesion, overwrite=cfg.overwrite, options=edit_options,
                                 **args)
        component = {} if op == "insert" else {"component": edit_options.component}
        records.append({"file": path.name, "source": stem, "op": op, **args, **component,
                        "summary": result.summary()})
    report = {"lesion_class": names[lesion], "edits": records, "failed": failed,
              "settings": OmegaConf.to_container(edit_cfg, resolve=True)}
    write_json(report, out / "edits.json", cfg.overwrite)
    print(f"{len(records)} edited label map(s) in {out}" + (f"; no valid edit found for {len(failed)}: "
                                                             f"{', '.join(failed[:3])}" if failed else ""))
    return report


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
    seeds = [int(s) for s in cfg.seeds]

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
            real_volumes = [store.case(c) for c in real_ids]
            synthetic_train = [store.scan(s) for s in scans]
            per_seed, training = [], []
            for seed in tqdm(seeds, desc=f"regime {regime}: {arm}", unit="seed"):
                model = train_segmenter(real_volumes, val_real, cfg, seed, synthetic=synthetic_train,
                                        synthetic_per_real=float(cfg.synthetic_per_real), device=device)
                training.append({"seed": seed, "steps": model.steps, "best_step": model.best_step,
                                 "seconds": model.seconds})
                per_seed.append(scores(evaluate_dice(model, test_real), keys))
                if regime == ALL and arm == REFERENCE and test_synthetic["test"]:
                    fidelity_scores["real"].append(per_seed[-1])
                    fidelity_scores["synthetic"].append(scores(evaluate_dice(model, test_synthetic["test"]), keys))
            arms_scores[arm] = per_seed
            entries[arm] = {"n_real": len(real_ids), "n_synthetic": len(scans),
                            "synthetic_sources": len({s.source for s in scans}), "seeds": seeds,
                            "training": training}
        add_statistics(entries, arms_scores, keys, cfg.bootstrap)
        regimes[regime] = {"n_real": len(real_ids), "cases": real_ids, "arms": entries}

    report = {
        "settings": {
            "dataset": str(cfg.dataset.name), "n_train": len(split["train"]), "n_val": len(split["val"]),
            "n_test": len(test_ids), "headline_class": lesion, "classes": keys, "regimes": list(subsets),
            "arms": [str(a) for a in cfg.arms], "seeds": seeds, "subset_seed": int(cfg.subset_seed),
            "synthetic_per_real": float(cfg.synthetic_per_real),
            "segmenter": asdict(segmenter_settings), "device": str(device),
            "bootstrap": OmegaConf.to_container(cfg.bootstrap, resolve=True),
            "dice": "per class on the real test cases, background excluded; mean over seeds within a case, then "
                    f"over cases; {MEAN_KEY}: per case the mean over the classes present",
            "ci": "paired percentile bootstrap over test cases (seeds averaged within each drawn case)",
            "split": "patient-level; the test split trains nothing",
            "validation": validation_note(split["val"]),
            "synthetic_test_ignored": test_synthetic["ignored"],
        },
        "n_cases": len(test_ids),
        "few_cases": len(test_ids) < int(cfg.bootstrap.min_cases),
        "regimes": regimes,
        "fidelity": fidelity(fidelity_scores, test_ids, test_sources, keys, cfg),
    }
    write_json(report, out / "augmentation.json", cfg.overwrite)
    write_csv(csv_rows(report, keys), out / "augmentation.csv", cfg.overwrite)
    lesion_figure(report, lesion, out / "augmentation.png", cfg.overwrite)
    print_summary(f"augmentation -> {out}", console_lines(report, lesion))
    return report


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


# outputs ------------------------------------------------------------------------------------------------------
def csv_rows(report: dict, keys: list[str]) -> list[dict]:
    rows = []
    for regime, entry in report["regimes"].items():
        for arm, stats in entry["arms"].items():
            if stats.get("skipped"):
                rows.append({"regime": regime, "n_real": entry["n_real"], "arm": arm, "skipped": stats["reason"]})
                continue
            for key in keys:
                dice = stats["dice"][key]
                difference = stats.get("difference", {}).get(key, {"mean": None, "ci": [None, None]})
                rows.append({"regime": regime, "n_real": entry["n_real"], "arm": arm, "class": key,
                             "dice": dice["mean"], "ci_low": dice["ci"][0], "ci_high": dice["ci"][1],
                             "difference": difference["mean"], "difference_ci_low": difference["ci"][0],
                             "difference_ci_high": difference["ci"][1], "n_cases": dice["n_cases"],
                             "few_cases": dice["few_cases"]})
    fid = report["fidelity"]
    if not fid.get("skipped"):
        for key in keys:
            ratio = fid["ratio"][key]
            rows.append({"regime": "fidelity", "n_real": report["settings"]["n_train"], "arm": "synthetic/real",
                         "class": key, "dice": fid["dice_synthetic"][key]["mean"],
                         "ci_low": fid["dice_synthetic"][key]["ci"][0], "ci_high": fid["dice_synthetic"][key]["ci"][1],
                         "ratio": ratio["value"], "ratio_ci_low": ratio["ci"][0], "ratio_ci_high": ratio["ci"][1],
                         "n_cases": ratio["n_cases"], "few_cases": ratio["few_cases"]})
    return rows


def lesion_figure(report: dict, lesion: str, path: Path, overwrite: bool) -> Path:
    """Lesion Dice vs the number of real training cases, one line per arm, with the 95 % intervals."""
    plt = figures.plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    arms = [str(a) for a in report["settings"]["arms"]]
    regimes = list(report["regimes"].values())
    for index, arm in enumerate(arms):
        points = [(r["n_real"], r["arms"][arm]["dice"][lesion]) for r in regimes
                  if not r["arms"][arm].get("skipped") and "dice" in r["arms"][arm]]
        if not points:
            continue
        x = np.array([p[0] for p in points], dtype=np.float64) * (1.0 + 0.03 * (index - (len(arms) - 1) / 2))
        y = np.array([p[1]["mean"] for p in points], dtype=np.float64)
        ci = np.array([p[1]["ci"] for p in points], dtype=np.float64)
        ax.errorbar(x, y, yerr=np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y])), marker="o", capsize=3, label=arm)
    ticks = sorted({r["n_real"] for r in regimes})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("real training cases")
    ax.set_ylabel(f"{lesion} Dice (real test cases)")
    flag = (f", fewer than {report['settings']['bootstrap']['min_cases']}: intervals unreliable"
            if report["few_cases"] else "")
    ax.set_title(f"{report['n_cases']} test cases, {len(report['settings']['seeds'])} seeds, "
                 f"{report['settings']['bootstrap']['confidence']:.0%} intervals{flag}", fontsize=9)
    ax.legend(fontsize=8)
    return figures._save(fig, path, overwrite)


def console_lines(report: dict, lesion: str) -> dict:
    lines = {}
    for regime, entry in report["regimes"].items():
        for arm, stats in entry["arms"].items():
            label = f"{regime} ({entry['n_real']} real) {arm}"
            if stats.get("skipped"):
                lines[label] = stats
                continue
            dice = stats["dice"][lesion]
            text = f"{lesion} Dice {dice['mean']:.3f} [{dice['ci'][0]:.3f}, {dice['ci'][1]:.3f}]"
            if "difference" in stats:
                d = stats["difference"][lesion]
                text += f", difference {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
            lines[label] = {"value": text}
    fid = report["fidelity"]
    lines["fidelity"] = fid if fid.get("skipped") else {
        "value": f"ratio synthetic/real {lesion} {fid['ratio'][lesion]['value']:.3f}, "
                 f"all classes {fid['ratio'][MEAN_KEY]['value']:.3f}"}
    if report["few_cases"]:
        lines["warning"] = {"value": f"only {report['n_cases']} test cases: intervals are flagged few_cases"}
    return lines


@hydra.main(version_base="1.3", config_path="../config", config_name="augmentation")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    if cfg.action == "edit_maps":
        make_edited_maps(cfg)
    elif cfg.action == "study":
        run(cfg)
    else:
        raise UserError(f"action={cfg.action}: expected study or edit_maps")


if __name__ == "__main__":
    main()
