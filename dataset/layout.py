"""Finding image/label pairs on disk.

Layouts:
- `images_labels`: `<root>/images/<case>.nii[.gz]` + `<root>/labels/<case>.nii[.gz]`, paired by file name.
- `nnunet`: `<root>/imagesTr/<case>_<CCCC>.nii[.gz]` (channel CCCC = `image_channel`) +
  `<root>/labelsTr/<case>.nii[.gz]`.
Hidden files (starting with '.') and sub-folders are ignored; any other non-NIfTI file is an error.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dataset.io import is_nifti_name, strip_nifti_suffix
from utils.errors import UserError

LAYOUT_FOLDERS = {"images_labels": ("images", "labels"), "nnunet": ("imagesTr", "labelsTr")}
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    case_id: str
    image_path: Path
    label_path: Path
    patient_id: str


def as_config(cfg: Mapping) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def required(cfg: DictConfig, key: str, hint: str = ""):
    """`cfg[key]`, or a `UserError` telling the user which override to pass."""
    if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] is None:
        raise UserError(f"dataset.{key} is not set{': ' + hint if hint else ''}")
    return cfg[key]


def dataset_root(cfg: Mapping) -> Path:
    """The data folder; for the demo data set with `root_dir: null`, builds the demo data first."""
    cfg = as_config(cfg)
    if cfg.get("name") == "demo" and not OmegaConf.is_missing(cfg, "root_dir") and cfg.get("root_dir") is None:
        from dataset.demo import ensure_demo_dataset

        return ensure_demo_dataset(cfg)
    root = Path(str(required(cfg, "root_dir", "pass dataset.root_dir=PATH (the folder holding your data)")))
    root = root.expanduser()
    if not root.exists():
        raise UserError(f"{root}: data folder does not exist (dataset.root_dir)")
    if not root.is_dir():
        raise UserError(f"{root}: dataset.root_dir is not a folder")
    if not any(root.iterdir()):
        raise UserError(f"{root}: data folder is empty")
    return root


def patient_id_of(case_id: str, pattern: str, where: Path) -> str:
    try:
        match = re.match(pattern, case_id)
    except re.error as err:
        raise UserError(f"dataset.patient_id_pattern: invalid regular expression {pattern!r} ({err})") from None
    if match is None:
        raise UserError(f"{where}: case name {case_id!r} does not match dataset.patient_id_pattern {pattern!r}")
    return match.group(1) if match.groups() else match.group(0)


def _nifti_files(folder: Path) -> dict[str, Path]:
    """Case name -> file for every NIfTI file in `folder`."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not is_nifti_name(path.name):
            raise UserError(f"{path}: not a NIfTI file (expected .nii or .nii.gz); remove it from {folder.name}/")
        name = strip_nifti_suffix(path.name)
        if name in files:
            raise UserError(f"{path}: duplicate of {files[name].name} (same case name)")
        files[name] = path
    return files


def _image_files(folder: Path, layout: str, channel: int) -> dict[str, Path]:
    files = _nifti_files(folder)
    if layout == "images_labels":
        return files
    wanted = f"{channel:04d}"
    by_case: dict[str, Path] = {}
    channels_of: dict[str, list[str]] = {}
    for name, path in files.items():
        match = CHANNEL_SUFFIX.match(name)
        if match is None:
            raise UserError(f"{path}: nnU-Net image name must end in a channel suffix such as _0000")
        channels_of.setdefault(match["case"], []).append(match["channel"])
        if match["channel"] == wanted:
            by_case[match["case"]] = path
    for case, channels in channels_of.items():
        if case not in by_case:
            raise UserError(f"{folder / case}: case has channel(s) {', '.join(sorted(channels))} but no "
                            f"_{wanted} image (dataset.image_channel={channel})")
    return by_case


def find_cases(cfg: Mapping) -> list[Case]:
    """Every image/label pair of the data set, sorted by case id; `UserError` on any pairing problem."""
    cfg = as_config(cfg)
    root = dataset_root(cfg)
    layout = str(required(cfg, "layout"))
    if layout not in LAYOUT_FOLDERS:
        raise UserError(f"dataset.layout: unknown layout {layout!r} (use {' or '.join(LAYOUT_FOLDERS)})")
    image_dir, label_dir = (root / name for name in LAYOUT_FOLDERS[layout])
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise UserError(f"{folder}: folder missing (dataset.layout={layout} expects "
                            f"{'/ and '.join(LAYOUT_FOLDERS[layout])}/ in {root})")
    images = _image_files(image_dir, layout, int(cfg.get("image_channel", 0)))
    labels = _nifti_files(label_dir)
    if not images:
        raise UserError(f"{image_dir}: no NIfTI images found")
    for name, path in images.items():
        if name not in labels:
            raise UserError(f"{path}: image has no label map (expected {label_dir.name}/{name}.nii.gz)")
    for name, path in labels.items():
        if name not in images:
            raise UserError(f"{path}: label map has no image in {image_dir.name}/")
    pattern = str(required(cfg, "patient_id_pattern"))
    return [Case(case_id=name, image_path=images[name], label_path=labels[name],
                 patient_id=patient_id_of(name, pattern, images[name])) for name in sorted(images)]
