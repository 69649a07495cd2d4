"""The one checkpoint reader of both stages, and the data settings a checkpoint carries.

Every checkpoint of this project is a dict with `"stage"` (`"vqgan"` or `"diffusion"`), the stage's metadata
under the same key and the weights under `"state_dict"`, loaded with `weights_only=True`. Any problem with a file
is a one-line `UserError` naming it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from utils.build import target_name
from utils.errors import UserError

STAGE_NAMES = {"vqgan": "stage-1 (VQ-GAN)", "diffusion": "stage-2 (diffusion)", "labels": "label-generator"}
# Data settings that must agree between the stage-1 checkpoint and the data stage 2 trains on (crop size may
# differ: the latent model sees its own crops).
MATCHING_DATA_SETTINGS = ("name", "modality", "spacing", "intensity", "label_nc", "class_names")


def read_checkpoint(path: str | os.PathLike, stage: str, *, needed: str,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict at `path`, checked to be a `stage` checkpoint with its metadata and weights.
    `needed` ends the wrong-stage message (what the caller expects, e.g. "sampling needs ...")."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file (not found)")
    if not path.is_file() or path.stat().st_size == 0:
        raise UserError(f"{path}: not a checkpoint file (empty or not a file)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for non-checkpoints; all mean a bad file
        reason = " ".join(str(err).split())[:120]
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: not a checkpoint of this project (expected a dict)")
    found = checkpoint.get("stage")
    if found != stage:
        what = (f"a {STAGE_NAMES[found]} checkpoint" if found in STAGE_NAMES
                else "not a checkpoint of this project (no stage entry)" if found is None
                else f"a checkpoint of stage {found!r}")
        raise UserError(f"{path}: {what}; {needed}")
    if not isinstance(checkpoint.get(stage), dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{path}: malformed {STAGE_NAMES[stage]} checkpoint (missing its settings or weights)")
    return checkpoint


def rebuild(path: str | os.PathLike, stage: str, node: Any, classes: Sequence[type], **extra: Any) -> Any:
    """The model a stored config node (`hparams`, see `utils.build.configurable`) describes, built with `extra`
    (dependencies such as the VQ-GAN). Its `_target_` must name one of `classes`, this project's own: a file never
    chooses what code runs. A node without a target (written before targets were stored) is the first class's. The
    class is called directly (no interpolation, no nested instantiation); a settings error is a malformed file."""
    allowed = {target_name(cls): cls for cls in classes}
    what = f"malformed {STAGE_NAMES[stage]} checkpoint"
    if not isinstance(node, dict):
        raise UserError(f"{path}: {what} (model settings are not a dict)")
    target = node.get("_target_", target_name(classes[0]))
    if target not in allowed:
        raise UserError(f"{path}: {what} (model class {target!r} is not one of {sorted(allowed)})")
    settings = {k: v for k, v in node.items() if k != "_target_"}
    try:
        return allowed[target](**settings, **extra)
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{path}: {what} (cannot rebuild the model: {' '.join(str(err).split())})") from None


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], prefix: str,
                 path: str | os.PathLike, what: str) -> None:
    """Load the `prefix`-ed entries of `state` into `model` (strict); a mismatch names `path`."""
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: weights do not match the stored {what} settings ({first})") from None


def dataset_settings(dataset_cfg: Mapping) -> dict[str, Any]:
    """What a checkpoint records about its training data: name, grid, intensities, classes, crop size."""
    names = dataset_cfg.get("class_names")
    return {"name": str(dataset_cfg["name"]), "modality": str(dataset_cfg["modality"]),
            "label_nc": int(dataset_cfg["label_nc"]),
            "class_names": [str(n) for n in names] if names else None,
            "spacing": [float(s) for s in dataset_cfg["spacing"]],
            "crop_size": [int(s) for s in dataset_cfg["crop_size"]],
            "intensity": OmegaConf.to_container(dataset_cfg["intensity"], resolve=True)
            if OmegaConf.is_config(dataset_cfg["intensity"]) else dict(dataset_cfg["intensity"])}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def check_data_settings(stored: Mapping[str, Any], current: Mapping[str, Any], source: str,
                        sides: tuple[str, str] = ("the stage-1 checkpoint", "the dataset config")) -> None:
    """Refuse data that differs from what a checkpoint was trained on, one setting at a time:
    `<source>: spacing [3.0, 3.0, 3.0] in the stage-1 checkpoint, [2.0, 2.0, 2.0] in the dataset config`
    (`sides` names where `stored` and `current` come from). A setting the checkpoint does not record (older
    files) is not compared; class names only when both have them."""
    for key in MATCHING_DATA_SETTINGS:
        if key not in stored or (key == "class_names" and (stored[key] is None or current.get(key) is None)):
            continue
        if not _same(stored[key], current.get(key)):
            label = "label classes" if key == "class_names" else key
            raise UserError(f"{source}: {label} {stored[key]!r} in {sides[0]}, {current.get(key)!r} in {sides[1]}")
