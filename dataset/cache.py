"""Preprocessed volumes on disk, so an epoch does not decode every .nii.gz again.

Layout: `<cache_dir>/preprocessed/<name>-<settings hash>/<case_id>-<file hash>/` holding `image.npy` (float32,
model grid, normalised), `label.npy` (smallest integer type), `foreground.npy` (sample of foreground voxel
coordinates for foreground-aware crops), `class_locations.npz` (a sample of each foreground class's voxel
coordinates, for crops centred on a rare class) and `meta.json` (grid info, intensity params, check statistics, source
file stats). The settings hash covers everything that changes the arrays; the file hash covers path, size and
modification time of the image and label, so an entry is reused exactly while settings and files are unchanged.
Entries are written into a temporary folder and renamed into place; nothing is ever written into the data folder.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset.geometry import GridInfo, to_model_grid
from dataset.intensity import build_normalizer
from dataset.layout import Case, as_config, required
from dataset.validate_case import CaseStats, load_checked_case
from utils.atomic import atomic_folder
from utils.errors import UserError
from utils.paths import cache_dir

CACHE_VERSION = 2  # bump when the preprocessing code changes what it writes
MAX_FOREGROUND_SAMPLES = 20000
MAX_CLASS_SAMPLES = 5000  # per foreground class


@dataclass
class PreprocessedCase:
    case_id: str
    image: np.ndarray  # float32 (X, Y, Z) in [-1, 1] on the model grid
    label: np.ndarray  # integer (X, Y, Z) on the model grid
    grid_info: GridInfo
    intensity_params: dict
    foreground: np.ndarray  # int32 (N, 3) voxel coordinates with label > 0 (a sample, possibly empty)
    stats: CaseStats
    class_locations: dict[int, np.ndarray]  # class -> int32 (N, 3) coordinates of its voxels (a sample)


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def settings_hash(cfg: Mapping) -> str:
    cfg = as_config(cfg)
    settings = {
        "version": CACHE_VERSION,
        "spacing": [float(s) for s in required(cfg, "spacing")],
        "intensity": {str(k): v for k, v in dict(cfg.intensity).items()},
        "label_nc": int(required(cfg, "label_nc", "set dataset.label_nc=K (number of label classes)")),
    }
    return _digest(settings)


def file_hash(case: Case) -> str:
    stats = []
    for path in (case.image_path, case.label_path):
        info = path.stat()
        stats.append([str(path.resolve()), info.st_size, info.st_mtime_ns])
    return _digest(stats)


def cache_folder(cfg: Mapping) -> Path:
    cfg = as_config(cfg)
    return cache_dir(cfg.get("cache_dir")) / "preprocessed" / f"{cfg.name}-{settings_hash(cfg)}"


def entry_folder(case: Case, cfg: Mapping) -> Path:
    return cache_folder(cfg) / f"{case.case_id}-{file_hash(case)}"


def cached_stats(case: Case, cfg: Mapping) -> CaseStats | None:
    """Check statistics of an up-to-date cache entry (the pair passed every check), else None."""
    meta = entry_folder(case, cfg) / "meta.json"
    if not meta.is_file():
        return None
    return CaseStats.from_dict(json.loads(meta.read_text())["stats"])


def _coordinate_sample(mask: np.ndarray, case_id: str, limit: int) -> np.ndarray:
    coords = np.argwhere(mask).astype(np.int32)
    if len(coords) > limit:
        rng = np.random.default_rng(int(_digest(case_id)[:8], 16))
        coords = coords[np.sort(rng.choice(len(coords), limit, replace=False))]
    return coords.reshape(-1, 3)


def _class_locations(label: np.ndarray, case_id: str) -> dict[int, np.ndarray]:
    return {int(c): _coordinate_sample(label == c, case_id, MAX_CLASS_SAMPLES) for c in np.unique(label) if c > 0}


def preprocess_case(case: Case, cfg: Mapping) -> PreprocessedCase:
    """Load, check, reorient, resample and normalise one pair (no caching)."""
    cfg = as_config(cfg)
    image, label, affine, stats = load_checked_case(case, int(cfg.label_nc))
    spacing = list(cfg.spacing)
    image_grid, grid_info = to_model_grid(image, affine, spacing, is_label=False)
    label_grid, _ = to_model_grid(label, affine, spacing, is_label=True)
    normalised, params = build_normalizer(cfg.intensity).forward(image_grid)
    return PreprocessedCase(case_id=case.case_id, image=normalised, label=label_grid, grid_info=grid_info,
                            intensity_params=params,
                            foreground=_coordinate_sample(label_grid > 0, case.case_id, MAX_FOREGROUND_SAMPLES),
                            stats=stats, class_locations=_class_locations(label_grid, case.case_id))


def _refuse_data_folder(folder: Path, case: Case) -> None:
    data_root = case.image_path.resolve().parent.parent
    if folder.resolve().is_relative_to(data_root):
        raise UserError(f"{folder}: the cache must not live inside the data folder {data_root}; "
                        "set dataset.cache_dir elsewhere")


def _write_entry(entry: PreprocessedCase, case: Case, folder: Path) -> None:
    _refuse_data_folder(folder, case)
    with atomic_folder(folder) as tmp:
        np.save(tmp / "image.npy", entry.image)
        np.save(tmp / "label.npy", entry.label)
        np.save(tmp / "foreground.npy", entry.foreground)
        np.savez(tmp / "class_locations.npz", **{f"class_{c}": v for c, v in entry.class_locations.items()})
        meta = {"case_id": case.case_id, "grid_info": entry.grid_info.to_dict(),
                "intensity_params": entry.intensity_params, "stats": entry.stats.to_dict()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    stale = re.compile(re.escape(case.case_id) + r"-[0-9a-f]{16}")
    for other in folder.parent.iterdir():
        if other != folder and stale.fullmatch(other.name):
            shutil.rmtree(other, ignore_errors=True)


def read_entry(folder: Path) -> PreprocessedCase:
    meta = json.loads((folder / "meta.json").read_text())
    return PreprocessedCase(
        case_id=meta["case_id"],
        image=np.load(folder / "image.npy", mmap_mode="r"),
        label=np.load(folder / "label.npy", mmap_mode="r"),
        grid_info=GridInfo.from_dict(meta["grid_info"]),
        intensity_params=meta["intensity_params"],
        foreground=np.load(folder / "foreground.npy"),
        stats=CaseStats.from_dict(meta["stats"]),
        class_locations=read_class_locations(folder),
    )


def read_class_locations(folder: Path) -> dict[int, np.ndarray]:
    with np.load(folder / "class_locations.npz") as saved:
        return {int(key.removeprefix("class_")): saved[key] for key in saved.files}


def ensure_cached(case: Case, cfg: Mapping) -> Path:
    """Preprocess `case` into the cache unless it is there; returns its entry folder (cheap to pass between
    processes, unlike the arrays)."""
    folder = entry_folder(case, cfg)
    if not (folder / "meta.json").is_file():
        _write_entry(preprocess_case(case, cfg), case, folder)
    return folder


def load_preprocessed(case: Case, cfg: Mapping) -> PreprocessedCase:
    """The preprocessed pair, from the cache (memory-mapped) or computed and cached now."""
    return read_entry(ensure_cached(case, cfg))
