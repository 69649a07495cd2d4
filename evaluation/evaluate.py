"""python -m evaluation.evaluate real=DIR fake=DIR [labels=DIR] out=DIR [metrics=[...]]
    [domain=native|normalized|percentile]

Paired image metrics (SSIM, MS-SSIM, PSNR, RMSE, MAE, LPIPS) between each synthetic volume and the real volume of
its stem, distribution metrics (FID/MMD on 2D Inception and 3D features) over all files, diversity between
samples of one label map and per-class intensity statistics. Writes `metrics.json`, `per_case.csv` and figures.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from evaluation import figures, metrics
from evaluation.distribution import FEATURE_METRICS, FeatureBank
from evaluation.intensity_domain import Intensity, parse_intensity
from evaluation.pairing import Pairing, pair_folders
from evaluation.report import print_summary, skipped, write_csv, write_json
from evaluation.volumes import load_label, load_volume, robust_window
from utils.atomic import check_writable
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error

PAIRED_METRICS = ("ssim", "ms_ssim", "psnr", "rmse", "mae")
KNOWN_METRICS = PAIRED_METRICS + ("lpips",) + tuple(FEATURE_METRICS) + ("diversity", "intensity_stats")
HISTOGRAM_VOXELS_PER_CASE = 20000  # per class and volume, enough for a smooth histogram
AFFINE_TOLERANCE_MM = 1e-3  # paired volumes' affines may differ by float32 rounding of the NIfTI header only


def requested_metrics(cfg) -> list[str]:
    names = list(cfg.metrics)
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise UserError(f"metrics: unknown {unknown}; known: {', '.join(KNOWN_METRICS)}")
    return names


def paired_values(real, fake, mask, names, intensity: Intensity, cfg) -> dict:
    values = {}
    if "ssim" in names:
        values["ssim"] = metrics.ssim3d(real, fake, data_range=intensity.data_range,
                                        low=intensity.low(real, fake), mask=mask, kernel_size=cfg.ssim.kernel_size,
                                        sigma=cfg.ssim.sigma)
    if "ms_ssim" in names:
        values["ms_ssim"] = ms_ssim(real, fake, mask, intensity, cfg)
    if "psnr" in names:
        values["psnr"] = metrics.psnr(real, fake, data_range=intensity.data_range, mask=mask)
    if "rmse" in names:
        values["rmse"] = metrics.rmse(real, fake, mask=mask)
    if "mae" in names:
        values["mae"] = metrics.mae(real, fake, mask=mask)
    return values


def ms_ssim(a, b, mask, intensity: Intensity, cfg) -> float:
    try:
        return metrics.ms_ssim3d(a, b, data_range=intensity.data_range, low=intensity.low(a, b), mask=mask,
                                 kernel_size=cfg.ms_ssim.kernel_size, scales=cfg.ms_ssim.scales)
    except ValueError as err:
        raise UserError(f"ms_ssim: {err}") from None


class ClassIntensities:
    """Running per-class mean/std of intensities, plus a voxel subsample for histograms."""

    def __init__(self, seed: int):
        self.sums: dict[int, np.ndarray] = {}
        self.samples: dict[int, list[np.ndarray]] = {}
        self.rng = np.random.default_rng(seed)

    def add(self, volume: np.ndarray, label: np.ndarray) -> None:
        for cls in np.unique(label):
            values = volume[label == cls].astype(np.float64)
            acc = self.sums.setdefault(int(cls), np.zeros(3))
            acc += (values.size, values.sum(), (values**2).sum())
            if values.size > HISTOGRAM_VOXELS_PER_CASE:
                values = self.rng.choice(values, HISTOGRAM_VOXELS_PER_CASE, replace=False)
            self.samples.setdefault(int(cls), []).append(values)

    def stats(self, class_names: list[str] | None = None) -> dict:
        out = {}
        for cls, (n, total, squares) in sorted(self.sums.items()):
            mean = total / n
            out[str(cls)] = {"mean": mean, "std": float(np.sqrt(max(squares / n - mean**2, 0.0))), "voxels": int(n)}
            if class_names is not None and cls < len(class_names):
                out[str(cls)]["name"] = class_names[cls]
        return out

    def histogram_data(self) -> dict[int, np.ndarray]:
        return {cls: np.concatenate(parts) for cls, parts in self.samples.items()}


def summarise(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    present = array[~np.isnan(array)]  # NaN: empty foreground mask
    if present.size == 0:
        return {"value": float("nan"), "std": float("nan"), "n": 0}
    if np.isinf(present).any():  # PSNR of identical volumes
        return {"value": float(np.mean(present)), "std": float("nan"), "n": int(present.size)}
    return {"value": float(np.mean(present)), "std": float(np.std(present)), "n": int(present.size)}


def paired_settings(name: str, intensity: Intensity, cfg, shape) -> dict:
    settings = intensity.describe()
    if name == "ssim":
        kernel = metrics.fit_kernel(cfg.ssim.kernel_size, min(shape))
        settings.update(window="gaussian, sums to 1", kernel_size=kernel,
                        sigma=cfg.ssim.sigma * kernel / cfg.ssim.kernel_size, k1=metrics.SSIM_K1, k2=metrics.SSIM_K2,
                        intensities_from=intensity.low_rule())
    elif name == "ms_ssim":
        kernel, scales = metrics.ms_ssim_settings(shape, cfg.ms_ssim.kernel_size, cfg.ms_ssim.scales)
        weights = np.asarray(metrics.MS_SSIM_WEIGHTS[:scales])
        settings.update(kernel_size=kernel, sigma=metrics.DEFAULT_SIGMA * kernel / metrics.DEFAULT_KERNEL_SIZE,
                        scales=scales, weights=(weights / weights.sum()).tolist(),
                        intensities_from=intensity.low_rule())
    elif name == "psnr":
        settings.update(unit="dB", identical_volumes="inf")
    elif name in ("rmse", "mae"):
        settings.update(unit="intensity units of the stated domain")
    return settings


@dataclass
class Collected:
    """What one pass over the volumes gathers for the metrics, `per_case.csv` and the figures."""

    real_stats: ClassIntensities
    fake_stats: ClassIntensities
    rows: list[dict] = field(default_factory=list)  # one per (real, synthetic) pair
    panel: list[dict] = field(default_factory=list)  # middle slices for the slice panel
    diversity: list[float] = field(default_factory=list)  # mean MS-SSIM between samples of one label map
    shape: tuple | None = None  # of the first real volume (the metrics' settings depend on it)


def collect(pairing: Pairing, names: list[str], intensity: Intensity, bank: FeatureBank, cfg) -> Collected:
    found = Collected(ClassIntensities(cfg.seed), ClassIntensities(cfg.seed + 1))
    groups = pairing.samples_by_source()
    for real_stem in tqdm(pairing.real, desc="evaluating", unit="case"):
        add_real_case(found, real_stem, groups.get(real_stem, []), pairing, names, intensity, bank, cfg)
    for fake_stem in tqdm(pairing.unpaired_fake, desc="unpaired synthetic", unit="case",
                          disable=not pairing.unpaired_fake):
        fake, fake_affine = load_volume(pairing.fake[fake_stem])
        fake = intensity.prepare(fake)
        bank.add("fake", fake, fake_affine, bank.slices(fake) if bank.uses_2d() else None)
    return found


def add_real_case(found: Collected, real_stem: str, fake_stems: list[str], pairing: Pairing, names: list[str],
                  intensity: Intensity, bank: FeatureBank, cfg) -> None:
    """One real volume and its synthetic samples: features, paired values, class intensities, panel, diversity."""
    real, affine = load_volume(pairing.real[real_stem])
    real = intensity.prepare(real)
    found.shape = found.shape or real.shape
    label = load_label(pairing.labels[real_stem], real.shape) if real_stem in pairing.labels else None
    mask = (label > 0) if intensity.foreground_only else None
    real_slices = bank.slices(real) if bank.uses_2d() else None
    bank.add("real", real, affine, real_slices)
    if label is not None:
        found.real_stats.add(real, label)
    samples = []
    for index, fake_stem in enumerate(fake_stems):
        fake, fake_affine = load_fake(pairing, fake_stem, real_stem, real.shape, affine)
        fake = intensity.prepare(fake)
        fake_slices = bank.slices(fake) if bank.uses_2d() else None
        bank.add("fake", fake, fake_affine, fake_slices)
        row = {"real": real_stem, "fake": fake_stem}
        row.update(paired_values(real, fake, mask, names, intensity, cfg))
        if "lpips" in bank.networks:
            row["lpips"] = bank.lpips(real_slices, fake_slices)
        found.rows.append(row)
        if label is not None:
            found.fake_stats.add(fake, label)
        if len(found.panel) < cfg.figures.panel_cases and index == 0:
            z = real.shape[2] // 2
            found.panel.append({"real": real[:, :, z], "fake": fake[:, :, z], "real_name": real_stem,
                                "fake_name": fake_stem, "label": None if label is None else label[:, :, z]})
        if "diversity" in names:
            samples.append(fake)
    if len(samples) >= 2:
        pairs = [ms_ssim(a, b, mask, intensity, cfg) for a, b in itertools.combinations(samples, 2)]
        found.diversity.append(float(np.mean(pairs)))


def metric_results(names: list[str], found: Collected, bank: FeatureBank, intensity: Intensity, cfg,
                   class_names: list[str] | None) -> dict:
    """Every requested metric's entry (a value with its settings, or why it was skipped), in request order."""
    results = {}
    for name in PAIRED_METRICS + ("lpips",):
        if name not in names:
            continue
        if name == "lpips" and "lpips" in bank.unavailable:
            results[name] = skipped(bank.unavailable["lpips"])
        elif not found.rows:
            results[name] = skipped("no synthetic file pairs with a real file by stem")
        else:
            entry = summarise([row[name] for row in found.rows])
            entry["settings"] = paired_settings(name, intensity, cfg, found.shape) if name != "lpips" else {
                "weights": str(cfg.lpips.weights), "slices_per_axis": cfg.inception.slices_per_axis,
                "input": "slices mapped to [-1, 1]", "window": intensity.window}
            results[name] = entry
    results.update(bank.results(names, cfg.mmd.bandwidth))
    if "diversity" in names:
        results["diversity"] = diversity_entry(found.diversity, intensity, cfg, found.shape)
    if "intensity_stats" in names:
        results["intensity_stats"] = intensity_entry(found.real_stats, found.fake_stats, intensity, class_names)
    return {name: results[name] for name in names}


def write_figures(found: Collected, outputs: list[Path], names: list[str], intensity: Intensity, cfg,
                  class_names: list[str] | None) -> None:
    if found.panel:
        figures.slice_panel(found.panel, path=outputs[2], overwrite=cfg.overwrite)
    if "intensity_stats" in names and found.real_stats.sums:
        unit = "intensity (native units)" if intensity.domain == "native" else "intensity ([-1, 1])"
        figures.class_histograms(found.real_stats.histogram_data(), found.fake_stats.histogram_data(),
                                 bins=cfg.figures.histogram_bins, unit=unit, path=outputs[3],
                                 overwrite=cfg.overwrite, class_names=class_names)


def run(cfg: DictConfig) -> dict:
    names = requested_metrics(cfg)
    class_names = None if cfg.class_names is None else [str(n) for n in cfg.class_names]
    out = Path(cfg.out)
    outputs = [out / "metrics.json", out / "per_case.csv", out / "figures" / "slice_panel.png"]
    if "intensity_stats" in names:
        outputs.append(out / "figures" / "intensity_histograms.png")
    for path in outputs:
        check_writable(path, cfg.overwrite)
    pairing = pair_folders(cfg.real, cfg.fake, cfg.labels)
    intensity = parse_intensity(cfg, has_labels=bool(pairing.labels))
    device = resolve_device(cfg.device)
    bank = FeatureBank(cfg, names, device=device, window=None)
    if bank.uses_2d() and intensity.domain == "native":
        bank.window = intensity.window or robust_window(pairing.real.values())
        intensity.window = bank.window
    found = collect(pairing, names, intensity, bank, cfg)
    results = metric_results(names, found, bank, intensity, cfg, class_names)
    report = {
        "settings": {
            "real": str(cfg.real), "fake": str(cfg.fake), "labels": None if cfg.labels is None else str(cfg.labels),
            **intensity.describe(), "clipping": intensity.clipping(), "window_for_2d_networks": intensity.window,
            "device": str(device),
            "n_real": len(pairing.real), "n_fake": len(pairing.fake), "n_pairs": len(found.rows),
            "unpaired_fake": pairing.unpaired_fake,
        },
        "metrics": results,
    }
    write_json(report, outputs[0], cfg.overwrite)
    write_csv(found.rows or [{"real": None, "fake": None}], outputs[1], cfg.overwrite)
    write_figures(found, outputs, names, intensity, cfg, class_names)
    print_summary(f"{len(found.rows)} pairs, {len(pairing.real)} real, {len(pairing.fake)} synthetic -> {out}",
                  results)
    return report


def load_fake(pairing: Pairing, fake_stem: str, real_stem: str, shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic volume, refused unless it lies on its real volume's voxel grid (shape and affine)."""
    fake_path, real_path = pairing.fake[fake_stem], pairing.real[real_stem]
    fake, fake_affine = load_volume(fake_path)
    if fake.shape != tuple(shape):
        raise UserError(f"{fake_path}: shape {fake.shape} differs from its real volume {real_path} {tuple(shape)}")
    if not np.allclose(fake_affine, affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        gap = float(np.abs(fake_affine - affine).max())
        raise UserError(f"{fake_path}: affine differs from that of its real volume {real_path} (by up to {gap:.3g} "
                        "mm); paired metrics compare voxel by voxel, so resample one onto the other's grid")
    return fake, fake_affine


def diversity_entry(values: list[float], intensity: Intensity, cfg, shape) -> dict:
    if not values:
        return skipped("needs at least two synthetic samples (<stem>_syn<k>) of the same label map")
    entry = summarise(values)
    entry["n_label_maps"] = entry.pop("n")
    entry["settings"] = dict(paired_settings("ms_ssim", intensity, cfg, shape),
                             meaning="mean pairwise MS-SSIM between samples of one label map; lower = more diverse")
    return entry


def intensity_entry(real: ClassIntensities, fake: ClassIntensities, intensity: Intensity,
                    class_names: list[str] | None) -> dict:
    if not real.sums:
        return skipped("needs labels=DIR (label maps of the real volumes)")
    real_stats, fake_stats = real.stats(class_names), fake.stats(class_names)
    gaps = [abs(fake_stats[c]["mean"] - real_stats[c]["mean"]) for c in real_stats if c in fake_stats]
    return {"value": float(np.mean(gaps)) if gaps else float("nan"),
            "meaning": "mean over classes of |synthetic mean - real mean|",
            "real": real_stats, "synthetic": fake_stats, "settings": intensity.describe()}


@hydra.main(version_base="1.3", config_path="../config", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
