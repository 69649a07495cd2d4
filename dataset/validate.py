"""`validate_dataset`: every bad-input check, run by `dataset.check` and before any training work.

Raises a one-line `UserError` naming the file or folder at the first problem and writes nothing. A pair whose
files are unchanged since they were preprocessed (same path, size and modification time, same settings) passed
these same checks then; its statistics are taken from the cache instead of decoding it again.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from dataset import cache
from dataset.geometry import model_grid_shape
from dataset.intensity import build_normalizer
from dataset.io import read_header
from dataset.layout import Case, as_config, dataset_root, find_cases, required
from dataset.validate_case import CaseStats, load_checked_case
from utils.errors import UserError

MODALITIES = ("ct", "mr")


@dataclass
class DatasetSummary:
    name: str
    modality: str
    root: Path
    layout: str
    label_nc: int
    class_names: list[str]
    spacing: list[float]
    cases: list[Case]
    stats: list[CaseStats] = field(default_factory=list)
    model_shapes: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def patients(self) -> list[str]:
        return sorted({case.patient_id for case in self.cases})

    @property
    def label_counts(self) -> np.ndarray:
        return np.sum([s.label_counts for s in self.stats], axis=0)

    def lines(self) -> list[str]:
        def span(rows, fmt):
            rows = np.asarray(rows)
            low, high = rows.min(axis=0), rows.max(axis=0)
            text = "x".join(fmt(v) for v in low)
            return text if np.array_equal(low, high) else f"{text} .. {'x'.join(fmt(v) for v in high)}"

        orientations: dict[str, int] = {}
        for s in self.stats:
            orientations[s.orientation] = orientations.get(s.orientation, 0) + 1
        n_oblique = sum(s.oblique for s in self.stats)
        counts = self.label_counts
        total = max(1, int(counts.sum()))
        lines = [
            f"data set: {self.name} ({self.modality.upper()}, {self.layout} layout) at {self.root}",
            f"cases: {len(self.cases)} from {len(self.patients)} patients",
            f"image shape (voxels): {span([s.shape for s in self.stats], str)}",
            f"spacing (mm): {span([s.spacing for s in self.stats], lambda v: f'{v:.3g}')}",
            "orientation: " + ", ".join(f"{k} {v}" for k, v in sorted(orientations.items()))
            + (f" ({n_oblique} oblique)" if n_oblique else ""),
            f"model grid at {'x'.join(f'{v:g}' for v in self.spacing)} mm: {span(self.model_shapes, str)} voxels",
            f"intensity range: {min(s.intensity_min for s in self.stats):.6g} .. "
            f"{max(s.intensity_max for s in self.stats):.6g}",
            f"label voxels ({self.label_nc} classes):",
        ]
        width = max(len(n) for n in self.class_names)
        for index, (name, count) in enumerate(zip(self.class_names, counts)):
            n_cases = sum(1 for s in self.stats if s.label_counts[index] > 0)
            lines.append(f"  {index:3d} {name:<{width}} {int(count):>12d} ({100 * count / total:5.2f}%, "
                         f"in {n_cases}/{len(self.stats)} cases)")
        return lines


def class_names(cfg) -> list[str]:
    label_nc = int(cfg.label_nc)
    names = cfg.get("class_names")
    if names is None:
        return ["background"] + [f"class_{i}" for i in range(1, label_nc)]
    names = [str(n) for n in names]
    if len(names) != label_nc:
        raise UserError(f"dataset.class_names: {len(names)} names given but dataset.label_nc is {label_nc}")
    return names


def resolve_class(entry, names: Sequence[str], key: str, *, allow_background: bool = False) -> int:
    """A class given by name (of `class_names`) or by index; background only with `allow_background`."""
    low = 0 if allow_background else 1
    if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool) and low <= entry < len(names):
        return int(entry)
    if isinstance(entry, str) and entry in names[low:]:
        return list(names).index(entry)
    raise UserError(f"{key}: {entry!r} is not a class of the data set ({', '.join(names[low:])}, or an index)")


def _positive_triple(cfg, key: str, integer: bool) -> list:
    values = list(required(cfg, key))
    if len(values) != 3 or any(float(v) <= 0 for v in values) or (integer and any(int(v) != v for v in values)):
        raise UserError(f"dataset.{key}: need three positive {'integers' if integer else 'numbers'}, got {values}")
    return values


def check_augment(augment_cfg: Mapping) -> None:
    flip_axes = list(augment_cfg["flip_axes"])
    if any(a not in (0, 1, 2) for a in flip_axes):
        raise UserError(f"dataset.augment.flip_axes: axes must be 0 (X), 1 (Y) or 2 (Z), got {flip_axes}")
    for key in ("affine_prob", "gamma_prob"):
        if not 0.0 <= float(augment_cfg[key]) <= 1.0:
            raise UserError(f"dataset.augment.{key}: need a probability, got {augment_cfg[key]}")
    if float(augment_cfg["rotation_deg"]) < 0 or not 0.0 <= float(augment_cfg["scale_range"]) < 1.0:
        raise UserError("dataset.augment: need rotation_deg >= 0 and 0 <= scale_range < 1")


def check_config(cfg: Mapping) -> None:
    """The data-set config itself: values a user may have overridden wrongly."""
    cfg = as_config(cfg)
    label_nc = required(cfg, "label_nc", "set dataset.label_nc=K (number of label classes, background included)")
    if not isinstance(label_nc, int) or label_nc < 2:
        raise UserError(f"dataset.label_nc: need an integer >= 2 (background + at least one class), got {label_nc}")
    if required(cfg, "modality") not in MODALITIES:
        raise UserError(f"dataset.modality: {cfg.modality!r} is not one of {', '.join(MODALITIES)}")
    class_names(cfg)
    _positive_triple(cfg, "spacing", integer=False)
    _positive_triple(cfg, "crop_size", integer=True)
    if not 0.0 <= float(cfg.foreground_crop_prob) <= 1.0:
        raise UserError(f"dataset.foreground_crop_prob: need a probability, got {cfg.foreground_crop_prob}")
    build_normalizer(cfg.intensity)
    check_augment(cfg.augment)
    for key in ("batch_size", "num_workers"):
        if not isinstance(cfg[key], int) or cfg[key] < (1 if key == "batch_size" else 0):
            raise UserError(f"dataset.{key}: need a {'positive' if key == 'batch_size' else 'non-negative'} "
                            f"integer, got {cfg[key]!r}")
    if not OmegaConf.is_missing(cfg, "root_dir") and cfg.root_dir is not None and cfg.get("cache_dir"):
        root = Path(str(cfg.root_dir)).expanduser().resolve()
        if Path(str(cfg.cache_dir)).expanduser().resolve().is_relative_to(root):
            raise UserError(f"{cfg.cache_dir}: dataset.cache_dir must not be inside the data folder {root}")


def check_case(case: Case, cfg: Mapping) -> CaseStats:
    """Statistics of a good pair (from the cache when its files are unchanged); `UserError` otherwise."""
    cfg = as_config(cfg)
    stats = cache.cached_stats(case, cfg)
    if stats is None:
        _, _, _, stats = load_checked_case(case, int(cfg.label_nc))
    stats.patient_id = case.patient_id  # the pattern may have changed since the entry was cached
    return stats


def validate_dataset(cfg: Mapping) -> DatasetSummary:
    """Run every bad-input check on the config and each pair; returns a `DatasetSummary`. Writes nothing
    (except that the demo data set is built on first use, into the cache)."""
    cfg = as_config(cfg)
    check_config(cfg)
    root = dataset_root(cfg)
    cases = find_cases(cfg)
    summary = DatasetSummary(name=str(cfg.name), modality=str(cfg.modality), root=root, layout=str(cfg.layout),
                             label_nc=int(cfg.label_nc), class_names=class_names(cfg),
                             spacing=[float(s) for s in cfg.spacing], cases=cases)
    for case in tqdm(cases, desc="checking", unit="case", leave=False, disable=None):  # a bar on a terminal
        summary.stats.append(check_case(case, cfg))
        shape, affine = read_header(case.image_path)
        summary.model_shapes.append(model_grid_shape(affine, shape[:3], cfg.spacing))
    return summary
