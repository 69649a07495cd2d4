"""python -m evaluation.memorization train=DIR fake=DIR out=DIR

Memorisation audit: for every synthetic volume, the most similar training volume by normalised
cross-correlation (NCC, both volumes resampled by voxel index to a common grid) and by feature distance.
A synthetic volume is flagged as a near-copy when its best NCC reaches `threshold` (`auto`: more similar to a
training volume than any two training volumes are to each other); NCC and feature distance are also put in scale
as percentiles of the training volumes' own nearest-neighbour values. A volume generated from a training label
map (`<training stem>_syn<k>`) shares that case's anatomy by construction, so its NCC to it is high by design.
So does a volume generated from a held-out map with the real scan of that map: with `real=DIR` (those real scans,
`<case>` for `<case>_syn<k>`), a volume above the threshold is flagged only if it is also closer to a training
volume than its own real scan is; otherwise the closeness is the label map's (`explained_by_label_map`).
Privacy check: synthetic NIfTI headers must carry no free-text metadata (descrip, aux_file, intent_name, db_name,
data_type) and no header extensions; only the names of offending fields are reported, never their content.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from evaluation import figures
from evaluation.features import MedicalNetFeatures, SegmenterFeatures, WeightsUnavailable
from evaluation.pairing import list_nifti, refuse_same_data, source_stem
from evaluation.report import print_summary, skipped, write_csv, write_json
from evaluation.volumes import load_volume
from utils.atomic import check_writable
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error

TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name", "data_type")
THUMBNAIL_SIZE = (16, 16, 16)


def resample(volume: np.ndarray, grid) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return F.interpolate(x, size=tuple(int(g) for g in grid), mode="trilinear", align_corners=False)[0, 0]


def standardised(volume: np.ndarray, grid) -> np.ndarray:
    """Flattened volume on `grid`, zero mean and unit norm, so a dot product is the NCC."""
    v = resample(volume, grid).double().flatten().numpy()
    v = v - v.mean()
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def header_metadata(path: Path) -> list[str]:
    """Names of header fields that carry text or extensions (their values are not returned)."""
    header = nib.load(str(path)).header
    found = []
    for field in TEXT_FIELDS:
        if field in header:
            value = np.asarray(header[field]).tobytes().strip(b"\x00 ")
            if value:
                found.append(field)
    if getattr(header, "extensions", None):
        found.append(f"extensions ({len(header.extensions)})")
    return found


class Featurizer:
    def __init__(self, cfg, device: torch.device):
        self.kind = cfg.features
        if self.kind == "segmenter":
            self.net = SegmenterFeatures(cfg.segmenter_weights, device=device, domain="native")
        elif self.kind == "medicalnet":
            self.net = MedicalNetFeatures(cfg.medicalnet.weights, depth=cfg.medicalnet.depth, device=device)
        elif self.kind != "thumbnail":
            raise UserError(f"features={self.kind}: use thumbnail, segmenter or medicalnet")

    def __call__(self, volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
        if self.kind == "thumbnail":
            v = resample(volume, THUMBNAIL_SIZE).double().flatten().numpy()
            return (v - v.mean()) / (v.std() + 1e-8)
        if self.kind == "segmenter":
            return self.net(volume, affine)
        return self.net(volume)


def nearest(similarity: np.ndarray, larger_is_closer: bool) -> tuple[np.ndarray, np.ndarray]:
    index = similarity.argmax(axis=1) if larger_is_closer else similarity.argmin(axis=1)
    return index, similarity[np.arange(len(index)), index]


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(d2, 0.0, None))


def leave_one_out(matrix: np.ndarray, larger_is_closer: bool) -> np.ndarray:
    """Each training volume's best match among the other training volumes."""
    m = matrix.copy()
    np.fill_diagonal(m, -np.inf if larger_is_closer else np.inf)
    return m.max(axis=1) if larger_is_closer else m.min(axis=1)


def near_copy_threshold(setting, reference_ncc: np.ndarray | None) -> float:
    """A number in (0, 1], or `auto`: the highest NCC between a training volume and its nearest other training
    volume (a synthetic volume above it is closer to a training volume than any two training volumes are)."""
    if setting == "auto":
        if reference_ncc is None:
            raise UserError("threshold=auto needs at least two training volumes; give a number instead")
        return float(reference_ncc.max())
    try:
        value = float(setting)
    except (TypeError, ValueError):
        raise UserError(f"threshold={setting}: use auto or a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise UserError(f"threshold={setting}: must be in (0, 1]")
    return value


def describe(paths: dict[str, Path], role: str, grid, featurizer: Featurizer | None
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """Standardised voxel vectors on `grid` (rows) and, with a featurizer, feature vectors of every file."""
    vectors, features = [], []
    for path in tqdm(paths.values(), desc=f"{role} volumes", unit="file"):
        volume, affine = load_volume(path)
        vectors.append(standardised(volume, grid))
        if featurizer is not None:
            features.append(featurizer(volume, affine))
    return np.stack(vectors), (np.stack(features) if features else None)


@dataclass
class Matches:
    """Per synthetic volume, its nearest training volume by NCC (and by feature distance), and the training
    volumes' own leave-one-out nearest values that put them in scale (None with a single training volume)."""

    ncc_index: np.ndarray
    ncc_best: np.ndarray
    reference_ncc: np.ndarray | None
    threshold: float
    feature_index: np.ndarray | None = None
    feature_best: np.ndarray | None = None
    reference_distance: np.ndarray | None = None


def match(train: tuple[np.ndarray, np.ndarray | None], fake: tuple[np.ndarray, np.ndarray | None],
          threshold_setting) -> Matches:
    (train_vectors, train_features), (fake_vectors, fake_features) = train, fake
    ncc_index, ncc_best = nearest(fake_vectors @ train_vectors.T, larger_is_closer=True)
    reference_ncc = None
    if len(train_vectors) > 1:
        reference_ncc = leave_one_out(train_vectors @ train_vectors.T, larger_is_closer=True)
    found = Matches(ncc_index, ncc_best, reference_ncc, near_copy_threshold(threshold_setting, reference_ncc))
    if train_features is not None:
        distances = pairwise_distances(fake_features, train_features)
        found.feature_index, found.feature_best = nearest(distances, larger_is_closer=False)
        if len(train_vectors) > 1:
            found.reference_distance = leave_one_out(pairwise_distances(train_features, train_features), False)
    return found


def real_nearest_ncc(real: dict[str, Path], train_vectors: np.ndarray, grid) -> dict[str, float]:
    """Each real scan's best NCC to a training volume: how close its label map's anatomy already is."""
    vectors, _ = describe(real, "real", grid, None)
    return dict(zip(real, nearest(vectors @ train_vectors.T, larger_is_closer=True)[1].tolist()))


def case_rows(found: Matches, fake: dict[str, Path], train: dict[str, Path],
              real_ncc: dict[str, float] | None = None) -> list[dict]:
    """One `per_case.csv` row per synthetic volume: its nearest training volumes, percentiles, header check;
    with `real_ncc` ({real stem: its best NCC to training}) also that of its own real scan."""
    train_names, rows = list(train), []
    for i, name in enumerate(fake):
        row = {"fake": name, "generated_from_training_label": source_stem(name, train) is not None,
               "nearest_train_ncc": train_names[found.ncc_index[i]], "ncc": float(found.ncc_best[i])}
        if found.reference_ncc is not None:
            row["ncc_percentile"] = float((found.reference_ncc < found.ncc_best[i]).mean() * 100)
        if found.feature_index is not None:
            row.update(nearest_train_feature=train_names[found.feature_index[i]],
                       feature_distance=float(found.feature_best[i]))
            if found.reference_distance is not None:
                row["feature_distance_percentile"] = float((found.reference_distance < found.feature_best[i]).mean()
                                                           * 100)
        row["header_metadata"] = ";".join(header_metadata(fake[name]))
        above = bool(found.ncc_best[i] >= found.threshold)
        source = None if real_ncc is None else source_stem(name, real_ncc)
        if source is not None:
            row["real_scan_ncc"] = real_ncc[source]
        explained = above and source is not None and found.ncc_best[i] <= real_ncc[source]
        row["explained_by_label_map"] = explained
        row["flagged"] = above and not explained
        rows.append(row)
    return rows


def summary_results(found: Matches, rows: list[dict], cfg, feature_reason: str | None) -> dict:
    flagged = [row["fake"] for row in rows if row["flagged"]]
    header_problems = {row["fake"]: row["header_metadata"].split(";") for row in rows if row["header_metadata"]}

    def reference_stat(values, fn):
        return None if values is None else float(fn(values))

    ncc_best, feature_best = found.ncc_best, found.feature_best
    return {
        "ncc": {"median": float(np.median(ncc_best)), "max": float(ncc_best.max()), "min": float(ncc_best.min()),
                "threshold": found.threshold, "threshold_rule": str(cfg.threshold), "n_flagged": len(flagged),
                "reference_train_nearest_median": reference_stat(found.reference_ncc, np.median),
                "reference_train_nearest_max": reference_stat(found.reference_ncc, np.max)},
        "feature_distance": skipped(feature_reason) if feature_best is None else {
            "features": cfg.features, "median": float(np.median(feature_best)), "min": float(feature_best.min()),
            "reference_train_nearest_min": reference_stat(found.reference_distance, np.min),
            "reference_train_nearest_median": reference_stat(found.reference_distance, np.median)},
        "flagged": flagged,
        "explained_by_label_map": [row["fake"] for row in rows if row["explained_by_label_map"]],
        "header_metadata": {"n_files": len(header_problems), "files": header_problems,
                            "checked": list(TEXT_FIELDS) + ["extensions"]},
    }


def run(cfg: DictConfig) -> dict:
    out = Path(cfg.out)
    outputs = [out / "memorization.json", out / "per_case.csv", out / "figures" / "nearest_ncc.png"]
    for path in outputs:
        check_writable(path, cfg.overwrite)
    train, fake = list_nifti(cfg.train, "train"), list_nifti(cfg.fake, "fake")
    refuse_same_data(cfg.train, cfg.fake, train, fake, real_role="train")
    device = resolve_device(cfg.device)
    try:
        featurizer, feature_reason = Featurizer(cfg, device), None
    except WeightsUnavailable as err:
        featurizer, feature_reason = None, str(err)
    train_described = describe(train, "training", cfg.grid, featurizer)
    found = match(train_described, describe(fake, "synthetic", cfg.grid, featurizer), cfg.threshold)
    real_ncc = None
    if cfg.real is not None:
        real = list_nifti(cfg.real, "real")
        refuse_same_data(cfg.real, cfg.fake, real, fake)
        real_ncc = real_nearest_ncc(real, train_described[0], cfg.grid)
    rows = case_rows(found, fake, train, real_ncc)
    results = summary_results(found, rows, cfg, feature_reason)
    report = {"settings": {"train": str(cfg.train), "fake": str(cfg.fake),
                           "real": None if cfg.real is None else str(cfg.real), "n_train": len(train),
                           "n_fake": len(fake), "grid": list(cfg.grid), "features": cfg.features,
                           "ncc": "Pearson correlation of voxels on the common grid",
                           "percentiles": "per case: % of training volumes whose nearest other training volume "
                                          "is less similar (100 = more similar than any two training volumes)"},
              "results": results}
    write_json(report, outputs[0], cfg.overwrite)
    write_csv(rows, outputs[1], cfg.overwrite)
    figures.nearest_neighbour_histogram(found.ncc_best, found.reference_ncc, threshold=found.threshold,
                                        xlabel="normalised cross-correlation", path=outputs[2],
                                        overwrite=cfg.overwrite)
    flagged, headers = results["flagged"], results["header_metadata"]["files"]
    print_summary(f"memorisation audit: {len(fake)} synthetic vs {len(train)} training -> {out}", {
        "median best NCC": {"value": results["ncc"]["median"]},
        f"near-copies (NCC >= {found.threshold:.4g})": {"value": f"{len(flagged)} {flagged[:5]}"},
        **({} if real_ncc is None else {"as close as their own real scan": {
            "value": f"{len(results['explained_by_label_map'])} {results['explained_by_label_map'][:5]}"}}),
        "feature distance": results["feature_distance"] if featurizer is None else
        {"value": results["feature_distance"]["median"]},
        "headers with metadata": {"value": f"{len(headers)} {sorted(headers)[:5]}"},
    })
    return report


@hydra.main(version_base="1.3", config_path="../config", config_name="memorization")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
