"""python -m evaluation.labelmaps [real=DIR] fake=DIR out=DIR [requested=CSV] [dataset=demo]

Is a generated label map any good? Generated maps (`fake`) against the generator's training maps (`real`; null:
the training split of `dataset`, split as training splits it). Class names and lesion classes come from the data
set config. Every map is read in RAS order (exact axis permutation/flip); counts are per map, averaged over maps.

- attribute fidelity (with `requested`, the CSV of requested attributes, `dataset.attributes` columns, matched to
  the fake maps by `case_id` = file stem): per lesion class, requested vs measured volume (Spearman and Pearson
  correlation, median absolute error in mL), the share of maps with the requested component count, and the median
  distance in mm between requested and measured centroid (normalised body coordinates scaled by the fake map's
  body box). With a `seed_index` column (`ddpm.generate` writes one: in a sweep, the pairs of one index share their
  seeds and their drawn attributes, so only the swept value changes among them) also the volume's Spearman
  correlation within each index of at least 3 maps, averaged, and the share of those indices whose measured volume
  rises strictly with the requested one: whether the request moves the lesion, apart from what else was drawn;
- plausibility (`evaluation.label_plausibility`), real and fake: components per class (26-connectivity), holes per
  class (cavities: components of everything else, 6-connected, that do not reach the outside of the class's bounding
  box), speckle (components smaller than `speckle_voxels`), the share of lesion voxels inside their host classes (a
  lesion voxel's host is the class of its nearest non-lesion voxel, i.e. what the lesion replaced; the host classes
  are `host_classes` or the classes hosting at least `host_min_share` of the training lesion voxels) and the class
  adjacency matrix (the share of all face-neighbour voxel pairs of two different classes that fall on each class
  pair; off the diagonal, summing to 1 over pairs) with the L1 distance fake vs real over class pairs (0 to 2);
- distribution: per-class volume (mL) histograms fake vs real, the two-sample Kolmogorov-Smirnov statistic (0 to 1)
  and the Wasserstein-1 distance in mL per class; the summary is the mean KS statistic over foreground classes;
- novelty: each fake map's nearest training map by mean foreground Dice (classes present in either map). Maps are
  compared on a common grid: resampled (nearest neighbour) to `grid_spacing` mm in RAS, cropped to the bounding
  box of their foreground and centred (background padding) in the largest such box over all maps. The reference is
  each training map's nearest other training map (leave-one-out); a fake map whose nearest Dice is above the
  largest of those (closer to a training map than any two training maps are) is flagged as a copy.

Writes `labelmaps.json`, `per_case.csv` (the fake maps) and `figures/volume_histograms.png`,
`figures/adjacency.png`, `figures/nearest_dice.png` in `out`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from scipy import stats
from tqdm import tqdm

from dataset.attributes import body_box, lesion_classes, measure, read_requested_csv, read_seed_index
from dataset.geometry import to_model_grid, voxel_spacing
from dataset.io import load_nifti
from dataset.validate import class_names as dataset_class_names
from dataset.validate import resolve_class
from evaluation import figures
from evaluation.label_plausibility import (adjacency_counts, adjacency_fractions, adjacency_l1, component_sizes,
                                          count_holes, host_counts)
from evaluation.memorization import leave_one_out, nearest
from evaluation.metrics import dice_per_class, mean_dice
from evaluation.pairing import list_nifti, refuse_same_data
from evaluation.report import print_summary, skipped, write_csv, write_json
from evaluation.volumes import to_canonical
from utils.atomic import check_writable
from utils.errors import UserError, exit_on_user_error


@dataclass
class LabelMap:
    name: str
    label: np.ndarray  # RAS order, int64
    affine: np.ndarray  # of the RAS array


# inputs ------------------------------------------------------------------------------------------------------
def label_folder(folder: str | Path, role: str) -> dict[str, Path]:
    """stem -> path of the label maps in `folder`, or in its `labels/` or `labelsTr/` subfolder (a data set or a
    generator's output folder)."""
    folder = Path(folder)
    for sub in ("labels", "labelsTr"):
        if (folder / sub).is_dir() and not any(p.name.endswith((".nii", ".nii.gz")) for p in folder.iterdir()):
            return list_nifti(folder / sub, role)
    return list_nifti(folder, role)


def load_map(path: Path, label_nc: int) -> LabelMap:
    array, affine = load_nifti(path)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise UserError(f"{path}: not a label map (non-integer values)")
    array, affine = to_canonical(np.asarray(array).astype(np.int64), affine)
    if array.size and (array.min() < 0 or array.max() >= label_nc):
        raise UserError(f"{path}: label values outside 0..{label_nc - 1} (dataset.label_nc={label_nc})")
    return LabelMap(name=path.name, label=array, affine=affine)


def real_paths(cfg: DictConfig) -> dict[str, Path]:
    if cfg.real is not None:
        return label_folder(cfg.real, "real")
    from dataset.datamodule import split_cases

    train = split_cases(cfg.dataset)["train"]
    if not train:
        raise UserError(f"dataset={cfg.dataset.name}: the training split is empty")
    return {case.case_id: case.label_path for case in train}


# plausibility ------------------------------------------------------------------------------------------------
def map_plausibility(item: LabelMap, label_nc: int, speckle_voxels: int, lesions: dict[str, int]) -> dict:
    per_class = {}
    for cls in range(1, label_nc):
        mask = item.label == cls
        sizes = component_sizes(mask)
        per_class[cls] = {"components": len(sizes), "holes": count_holes(mask),
                          "speckle": int((sizes < speckle_voxels).sum())}
    spacing = voxel_spacing(item.affine)
    hosts = {name: host_counts(item.label, index, spacing, label_nc) for name, index in lesions.items()}
    return {"per_class": per_class, "adjacency": adjacency_counts(item.label, label_nc), "hosts": hosts,
            "volumes_ml": np.bincount(item.label.ravel(), minlength=label_nc)
            * float(abs(np.linalg.det(item.affine[:3, :3]))) / 1000.0}


def host_classes_of(cfg: DictConfig, real_hosts: dict[str, np.ndarray], names: list[str]) -> dict[str, list[int]]:
    """Host classes per lesion class: `host_classes` (names or indices), else those hosting at least
    `host_min_share` of the training maps' lesion voxels."""
    if cfg.host_classes is not None:
        chosen = [resolve_class(entry, names, "host_classes", allow_background=True) for entry in cfg.host_classes]
        return {name: chosen for name in real_hosts}
    share = float(cfg.host_min_share)
    if not 0 < share <= 1:
        raise UserError(f"host_min_share={cfg.host_min_share}: must be in (0, 1]")
    found = {}
    for name, counts in real_hosts.items():
        total = counts.sum()
        found[name] = [int(c) for c in np.flatnonzero(counts >= share * total)] if total else []
    return found


def summarise_set(maps: list[dict], names: list[str], hosts: dict[str, list[int]], label_nc: int) -> dict:
    summary = {"per_class": {}}
    for cls in range(1, label_nc):
        summary["per_class"][names[cls]] = {key: float(np.mean([m["per_class"][cls][key] for m in maps]))
                                            for key in ("components", "holes", "speckle")}
    summary["host_share"] = {}
    for name, classes in hosts.items():
        counts = sum(m["hosts"][name] for m in maps)
        total = counts.sum()
        summary["host_share"][name] = float(counts[classes].sum() / total) if total else None
    summary["adjacency"] = adjacency_fractions(sum(m["adjacency"] for m in maps))
    return summary


# distribution and novelty ------------------------------------------------------------------------------------
def volume_distribution(real: np.ndarray, fake: np.ndarray, names: list[str]) -> dict:
    per_class = {}
    for cls in range(1, len(names)):
        per_class[names[cls]] = {"ks_statistic": float(stats.ks_2samp(real[:, cls], fake[:, cls]).statistic),
                                 "wasserstein_ml": float(stats.wasserstein_distance(real[:, cls], fake[:, cls])),
                                 "real_median_ml": float(np.median(real[:, cls])),
                                 "fake_median_ml": float(np.median(fake[:, cls]))}
    return {"per_class": per_class, "mean_ks_statistic": float(np.mean([v["ks_statistic"]
                                                                         for v in per_class.values()]))}


def on_common_grid(maps: list[LabelMap], spacing) -> list[np.ndarray]:
    """Maps resampled to `spacing` (nearest), cropped to their foreground box and centred in the largest box (each
    box's centre voxel on the grid's, so how two maps overlap does not depend on the other maps of the call)."""
    cropped = []
    for item in maps:
        grid = to_model_grid(item.label, item.affine, spacing, is_label=True)[0]
        hits = np.nonzero(grid)
        if hits[0].size:
            grid = grid[tuple(slice(int(a.min()), int(a.max()) + 1) for a in hits)]
        cropped.append(grid)
    shape = np.max([c.shape for c in cropped], axis=0)
    placed = []
    for grid in cropped:
        out = np.zeros(shape, np.int64)
        start = shape // 2 - np.array(grid.shape) // 2
        out[tuple(slice(int(s), int(s) + n) for s, n in zip(start, grid.shape))] = grid
        placed.append(out)
    return placed


def dice_matrix(a: list[np.ndarray], b: list[np.ndarray], label_nc: int, desc: str) -> np.ndarray:
    matrix = np.zeros((len(a), len(b)))
    for i, x in enumerate(tqdm(a, desc=desc, unit="map", leave=False)):
        for j, y in enumerate(b):
            matrix[i, j] = mean_dice(dice_per_class(x, y, label_nc))
    return np.nan_to_num(matrix, nan=0.0)


def novelty(real: list[np.ndarray], fake: list[np.ndarray], label_nc: int) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray, float]:
    """(index of each fake map's nearest training map, its Dice, the training maps' leave-one-out nearest Dice,
    the copy threshold = the largest of those)."""
    reference = leave_one_out(dice_matrix(real, real, label_nc, "training vs training"), larger_is_closer=True)
    index, best = nearest(dice_matrix(fake, real, label_nc, "generated vs training"), larger_is_closer=True)
    return index, best, reference, float(reference.max())


# attribute fidelity ------------------------------------------------------------------------------------------
def correlation(fn, x: list[float], y: list[float]) -> float | None:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(fn(x, y).statistic)


def within_seed_volume(requested: list[float], measured: list[float], seeds: list[int]) -> dict:
    """Requested vs measured volume within each seed index of at least 3 maps with distinct requests: their mean
    Spearman correlation and the share whose measured volume rises strictly along the request."""
    rhos, rising = [], []
    for seed in sorted(set(seeds)):
        members = [i for i, s in enumerate(seeds) if s == seed]
        wanted = np.asarray([requested[i] for i in members])
        made = np.asarray([measured[i] for i in members])
        if len(members) < 3 or len(np.unique(wanted)) < len(members):
            continue
        order = np.argsort(wanted)
        rising.append(bool(np.all(np.diff(made[order]) > 0)))
        rho = correlation(stats.spearmanr, list(wanted), list(made))
        rhos.append(0.0 if rho is None else rho)  # a constant measured volume does not follow the request
    return {"n_seeds": len(rhos), "mean_spearman": float(np.mean(rhos)) if rhos else None,
            "share_rising": float(np.mean(rising)) if rising else None}


def attribute_fidelity(requests: dict, fake: dict[str, LabelMap], lesions: dict[str, int], source: str,
                       seed_index: dict[str, int] | None = None) -> dict:
    missing = sorted(set(requests) - set(fake))
    if missing:
        raise UserError(f"{source}: case_id {missing[0]} has no generated label map in fake= "
                        f"({len(missing)} rows unmatched)")
    result = {}
    for name in lesions:
        volume, count, centroid_mm, seeds = ([], []), [], [], []
        for stem, request in requests.items():
            wanted = request.get(name)
            if not wanted:
                continue
            item = fake[stem]
            measured = measure(item.label, item.affine, {name: lesions[name]})[name]
            if "volume_ml" in wanted:
                volume[0].append(wanted["volume_ml"])
                volume[1].append(measured.volume_ml)
                seeds.append(None if seed_index is None else seed_index[stem])  # both from one CSV
            if "count" in wanted:
                count.append(measured.count == wanted["count"])
            if "centroid" in wanted and measured.centroid is not None:
                low, high = body_box(item.label, item.affine)
                centroid_mm.append(float(np.linalg.norm((np.subtract(wanted["centroid"], measured.centroid))
                                                        * (high - low))))
        errors = np.abs(np.subtract(volume[1], volume[0]))
        result[name] = {
            "volume": {"n": len(volume[0]), "spearman": correlation(stats.spearmanr, *volume),
                       "pearson": correlation(stats.pearsonr, *volume),
                       "median_abs_error_ml": float(np.median(errors)) if errors.size else None,
                       **({} if seed_index is None else {"within_seed": within_seed_volume(*volume, seeds)})},
            "count": {"n": len(count), "share_exact": float(np.mean(count)) if count else None},
            "centroid": {"n": len(centroid_mm),
                         "median_error_mm": float(np.median(centroid_mm)) if centroid_mm else None},
        }
    return result


# the CLI -----------------------------------------------------------------------------------------------------
def input_files(cfg: DictConfig) -> tuple[dict[str, Path], dict[str, Path]]:
    """The training maps (`real`, or the data set's training split) and the generated ones (`fake`), by stem:
    not the same data, and at least two training maps (the novelty reference needs each one's nearest other)."""
    fake_paths = label_folder(cfg.fake, "fake")
    real_files = real_paths(cfg)
    if cfg.real is not None:
        refuse_same_data(cfg.real, cfg.fake, real_files, fake_paths)
    if len(real_files) < 2:
        raise UserError(f"{cfg.real or 'dataset'}: need at least two training label maps (the novelty reference "
                        f"is each one's nearest other one)")
    return real_files, fake_paths


def per_case_rows(fake_stems: list[str], fake_maps: list[dict], nearest: list[str], best: np.ndarray,
                  flagged: list[str], names: list[str]) -> list[dict]:
    """per_case.csv: per generated map its nearest training map and Dice, and per class its components, holes,
    speckle and volume."""
    rows = []
    for i, (stem, item) in enumerate(zip(fake_stems, fake_maps)):
        row = {"fake": stem, "nearest_train": nearest[i], "nearest_dice": float(best[i]),
               "flagged_copy": stem in flagged}
        for cls in range(1, len(names)):
            row.update({f"{names[cls]}_{key}": item["per_class"][cls][key]
                        for key in ("components", "holes", "speckle")})
            row[f"{names[cls]}_volume_ml"] = float(item["volumes_ml"][cls])
        rows.append(row)
    return rows


def write_figures(outputs: dict, volumes: tuple, summaries: tuple, nearest: tuple, names: list[str], bins: int,
                  overwrite: bool) -> None:
    """Class-volume histograms, adjacency matrices and nearest-training-Dice histogram, training vs generated."""
    (real_volumes, fake_volumes), (real_summary, fake_summary) = volumes, summaries
    best, reference, threshold = nearest
    figures.class_histograms({c: real_volumes[:, c] for c in range(1, len(names))},
                             {c: fake_volumes[:, c] for c in range(1, len(names))}, bins=bins, unit="mL",
                             path=outputs["volumes"], overwrite=overwrite, class_names=names,
                             title="Volume per label class: training vs generated maps")
    figures.adjacency_matrices({"training": real_summary["adjacency"], "generated": fake_summary["adjacency"]},
                               names, path=outputs["adjacency"], overwrite=overwrite)
    figures.nearest_neighbour_histogram(best, reference, threshold=threshold, xlabel="mean foreground Dice",
                                        path=outputs["novelty"], overwrite=overwrite)


def run_settings(cfg: DictConfig, names: list[str], lesions, speckle_voxels: int, spacing: list[float]) -> dict:
    """What `labelmaps.json` records of the run's inputs and settings."""
    return {"real": str(cfg.real) if cfg.real is not None else f"training split of dataset={cfg.dataset.name}",
            "fake": str(cfg.fake), "class_names": names, "lesion_classes": list(lesions),
            "requested": None if cfg.requested is None else str(cfg.requested),
            "speckle_voxels": speckle_voxels, "grid_spacing_mm": spacing,
            "connectivity": "components 26-connected; holes 6-connected; adjacency face pairs"}


def run(cfg: DictConfig) -> dict:
    out = Path(str(cfg.out))
    outputs = {"json": out / "labelmaps.json", "csv": out / "per_case.csv",
               "volumes": out / "figures" / "volume_histograms.png", "adjacency": out / "figures" / "adjacency.png",
               "novelty": out / "figures" / "nearest_dice.png"}
    overwrite = bool(cfg.overwrite)
    for path in outputs.values():
        check_writable(path, overwrite)
    speckle_voxels = int(cfg.speckle_voxels)
    if speckle_voxels < 1:
        raise UserError(f"speckle_voxels={cfg.speckle_voxels}: must be at least 1")
    names = dataset_class_names(cfg.dataset)
    label_nc = len(names)
    lesions = lesion_classes(cfg.dataset)
    real_files, fake_paths = input_files(cfg)
    requests = None if cfg.requested is None else read_requested_csv(cfg.requested, list(lesions))
    real = [load_map(p, label_nc) for p in tqdm(real_files.values(), desc="training maps", unit="map")]
    fake = [load_map(p, label_nc) for p in tqdm(fake_paths.values(), desc="generated maps", unit="map")]

    real_maps = [map_plausibility(m, label_nc, speckle_voxels, lesions) for m in real]
    fake_maps = [map_plausibility(m, label_nc, speckle_voxels, lesions) for m in fake]
    hosts = host_classes_of(cfg, {name: sum(m["hosts"][name] for m in real_maps) for name in lesions}, names)
    real_summary = summarise_set(real_maps, names, hosts, label_nc)
    fake_summary = summarise_set(fake_maps, names, hosts, label_nc)
    real_volumes = np.stack([m["volumes_ml"] for m in real_maps])
    fake_volumes = np.stack([m["volumes_ml"] for m in fake_maps])

    spacing = [float(s) for s in (cfg.grid_spacing if cfg.grid_spacing is not None else cfg.dataset.spacing)]
    grids = on_common_grid(real + fake, spacing)
    index, best, reference, threshold = novelty(grids[:len(real)], grids[len(real):], label_nc)
    real_stems, fake_stems = list(real_files), list(fake_paths)
    flagged = [fake_stems[i] for i in np.flatnonzero(best > threshold)]

    results = {
        "attribute_fidelity": skipped("no requested= CSV") if requests is None else
        attribute_fidelity(requests, dict(zip(fake_stems, fake)), lesions, str(cfg.requested),
                           read_seed_index(cfg.requested)),
        "plausibility": {
            "real": {k: v for k, v in real_summary.items() if k != "adjacency"},
            "fake": {k: v for k, v in fake_summary.items() if k != "adjacency"},
            "host_classes": {name: [names[c] for c in classes] for name, classes in hosts.items()},
            "adjacency_l1": adjacency_l1(fake_summary["adjacency"], real_summary["adjacency"]),
            "adjacency_real": real_summary["adjacency"], "adjacency_fake": fake_summary["adjacency"],
        },
        "distribution": volume_distribution(real_volumes, fake_volumes, names),
        "novelty": {"median_nearest_dice": float(np.median(best)), "max_nearest_dice": float(best.max()),
                    "reference_train_nearest_median": float(np.median(reference)),
                    "copy_threshold": threshold, "n_flagged": len(flagged), "flagged": flagged},
    }
    report = {"settings": {**run_settings(cfg, names, lesions, speckle_voxels, spacing), "n_real": len(real),
                           "n_fake": len(fake)},
              "results": results}
    nearest = [real_stems[i] for i in index]
    write_json(report, outputs["json"], overwrite)
    write_csv(per_case_rows(fake_stems, fake_maps, nearest, best, flagged, names), outputs["csv"], overwrite)
    write_figures(outputs, (real_volumes, fake_volumes), (real_summary, fake_summary), (best, reference, threshold),
                  names, int(cfg.histogram_bins), overwrite)
    print_summary(f"label maps: {len(fake)} generated vs {len(real)} training -> {out}", {
        "adjacency L1 (0..2)": {"value": results["plausibility"]["adjacency_l1"]},
        "mean KS of class volumes": {"value": results["distribution"]["mean_ks_statistic"]},
        **{f"{name} voxels in host classes (fake)": {"value": fake_summary["host_share"][name]} for name in lesions},
        f"copies (nearest Dice > {threshold:.4g})": {"value": f"{len(flagged)} {flagged[:5]}"},
    })
    return report


@hydra.main(version_base="1.3", config_path="../config", config_name="labelmaps")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
