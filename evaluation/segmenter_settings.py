"""The segmenter's settings (config/segmenter/default.yaml), read and checked once: `settings_from(cfg)` gives the
`Settings` that `evaluation.segmenter` trains, validates and predicts with."""
from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import OmegaConf

from dataset.attributes import lesion_classes
from dataset.validate import class_names as dataset_class_names
from utils.errors import UserError

def network_settings(network_cfg, label_nc: int) -> dict:
    return {"label_nc": int(label_nc), "channels": [int(c) for c in network_cfg.channels],
            "strides": [int(s) for s in network_cfg.strides], "num_res_units": int(network_cfg.num_res_units),
            "dropout": float(network_cfg.dropout)}


@dataclass(frozen=True)
class Settings:
    """Everything `train_segmenter` reads from the config, checked."""

    network: dict
    class_names: list[str]
    report_order: list[int]      # foreground classes, the lesion classes first
    lesions: list[int]
    crop_size: list[int]
    max_steps: int
    batch_size: int
    lr: float
    lr_schedule: str
    class_crop_fraction: float
    crop_classes: list[int]
    dice_weight: float
    ce_weight: float
    every_n_steps: int
    patience: int | None
    lesion_weight: float
    overlap: float
    min_lesion_candidates: list[int]   # sizes (voxels) the validation cases choose the lesion size floor from


def _class_indices(entries, names: list[str], key: str) -> list[int]:
    indices = []
    for entry in entries:
        if isinstance(entry, str) and entry in names[1:]:
            indices.append(names.index(entry))
        elif isinstance(entry, int) and not isinstance(entry, bool) and 1 <= entry < len(names):
            indices.append(int(entry))
        else:
            raise UserError(f"segmenter.train.{key}: {entry!r} is not a foreground class of dataset.class_names "
                            f"({', '.join(names[1:])})")
    return sorted(set(indices))


LR_SCHEDULES = ("constant", "cosine")


def _schedule(name) -> str:
    if str(name) not in LR_SCHEDULES:
        raise UserError(f"segmenter.train.lr_schedule: use {' or '.join(LR_SCHEDULES)}, got {name!r}")
    return str(name)


def _number(value, key: str, kind, low, high=math.inf):
    number = kind(value)
    if not low <= number <= high:
        raise UserError(f"segmenter.{key}: must lie in [{low}, {high}], got {value}")
    return number


def settings_from(cfg) -> Settings:
    names = dataset_class_names(cfg.dataset)
    lesions = sorted(lesion_classes(cfg.dataset).values())
    seg = cfg.segmenter
    train, validation = seg.train, seg.validation
    crop_classes = train.crop_classes
    crop = [int(c) for c in (train.crop_size or cfg.dataset.crop_size)]
    if len(crop) != 3 or min(crop) < 1:
        raise UserError(f"segmenter.train.crop_size: need three positive integers, got {crop}")
    return Settings(
        network=network_settings(seg.network, len(names)),
        class_names=names,
        report_order=lesions + [c for c in range(1, len(names)) if c not in lesions],
        lesions=lesions,
        crop_size=crop,
        max_steps=_number(train.max_steps, "train.max_steps", int, 1),
        batch_size=_number(train.batch_size, "train.batch_size", int, 1),
        lr=_number(train.lr, "train.lr", float, 0.0),
        lr_schedule=_schedule(train.lr_schedule),
        class_crop_fraction=_number(train.class_crop_fraction, "train.class_crop_fraction", float, 0.0, 1.0),
        crop_classes=(_class_indices(list(crop_classes), names, "crop_classes") if crop_classes is not None
                      else lesions or list(range(1, len(names)))),
        dice_weight=_number(train.dice_weight, "train.dice_weight", float, 0.0),
        ce_weight=_number(train.ce_weight, "train.ce_weight", float, 0.0),
        every_n_steps=_number(validation.every_n_steps, "validation.every_n_steps", int, 1),
        patience=None if validation.patience is None else _number(validation.patience, "validation.patience",
                                                                  int, 1),
        lesion_weight=_number(validation.lesion_weight, "validation.lesion_weight", float, 0.0, 1.0),
        overlap=_number(seg.inference.overlap, "inference.overlap", float, 0.0, 0.95),
        min_lesion_candidates=_candidates(seg.inference.min_lesion_voxels),
    )


def _candidates(values) -> list[int]:
    entries = list(values) if OmegaConf.is_list(values) or isinstance(values, (list, tuple)) else [values]
    if not entries or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in entries):
        raise UserError(f"segmenter.inference.min_lesion_voxels: need a list of voxel counts >= 0, got {values}")
    return sorted(set(int(v) for v in entries))
