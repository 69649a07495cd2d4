"""Loading a trained stage 1 safely (`weights_only=True`) from the Lightning checkpoints of a VQ-GAN run.

A stage-1 checkpoint carries `"stage": "vqgan"`, `"vqgan": {"hparams": VQGAN.hparams (the `model.vqgan` config
node it was built from, `_target_` included; files without the target still load), "dataset": {...},
"intensity_reference": {...} | None, "split": {"train", "val", "test": [case ids]} | None}` and the weights under
`state_dict["vqgan.*"]` (the LightningModule's attribute). Reading and checking the file is
`utils.checkpoint.read_checkpoint`, shared with stage 2.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dataset.split import check_split, read_split
from utils.atomic import atomic_path
from utils.checkpoint import check_data_settings, dataset_settings, load_weights, rebuild
from utils.checkpoint import read_checkpoint as read_any_checkpoint
from utils.errors import UserError
from vq_gan_3d.model import VQGAN

STAGE = "vqgan"
STATE_PREFIX = "vqgan."
NEEDED = "expected the last.ckpt/best.ckpt of a VQ-GAN (stage-1) training run"

log = logging.getLogger(__name__)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict of a stage-1 run, with its stage and metadata checked."""
    checkpoint = read_any_checkpoint(path, STAGE, needed=NEEDED, map_location=map_location)
    if not isinstance(checkpoint[STAGE].get("hparams"), dict):
        raise UserError(f"{path}: malformed stage-1 checkpoint (missing VQ-GAN settings)")
    return checkpoint


def load_vqgan_with_metadata(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                             ) -> tuple[VQGAN, dict[str, Any]]:
    """The trained VQ-GAN (eval mode, `requires_grad=False`) and the checkpoint's `"vqgan"` metadata."""
    checkpoint = read_checkpoint(path, map_location)
    meta = checkpoint[STAGE]
    model = rebuild(path, STAGE, meta["hparams"], [VQGAN])
    load_weights(model, checkpoint["state_dict"], STATE_PREFIX, path, "VQ-GAN")
    if not bool(model.quantizer.initialized):
        raise UserError(f"{path}: the codebook was never initialised (saved before the first training step)")
    return model.to(map_location).eval().requires_grad_(False), meta


def load_vqgan(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VQGAN:
    """The trained VQ-GAN of a stage-1 checkpoint, in eval mode with `requires_grad=False`."""
    return load_vqgan_with_metadata(path, map_location)[0]


def load_vqgan_for_dataset(path: str | os.PathLike, dataset_cfg: Mapping, source: str,
                           map_location: str | torch.device = "cpu"
                           ) -> tuple[VQGAN, dict[str, list[str]] | None]:
    """The VQ-GAN of `path` for work on `dataset_cfg` (stage 2, encoding), and the patient split it was trained
    with. A data set, modality, spacing, intensity map or label classes other than the checkpoint's is a
    `UserError` starting with `source` (the config key naming the checkpoint). Files written before the split was
    stored: the `split.json` next to the checkpoint (its run directory) if there is one, else None (the caller
    recomputes the split from `dataset.split`), with a logged warning either way."""
    model, meta = load_vqgan_with_metadata(path, map_location)
    if isinstance(meta.get("dataset"), dict):
        check_data_settings(meta["dataset"], dataset_settings(dataset_cfg), source)
    else:
        log.warning("%s: the stage-1 checkpoint does not record its data settings; they are not compared", source)
    if meta.get("split") is not None:
        return model, check_split(meta["split"], f"{source} (stored split)")
    sibling = Path(path).parent / "split.json"
    if sibling.is_file():
        log.warning("%s: the stage-1 checkpoint stores no split (written by an older version); using %s",
                    source, sibling)
        return model, read_split(sibling)
    log.warning("%s: the stage-1 checkpoint stores no split and no split.json lies next to it; the split is "
                "recomputed from dataset.split, which matches stage 1 only if the cases and split settings are "
                "unchanged", source)
    return model, None


def checkpoint_metadata(model: VQGAN, *, dataset: dict | None = None, intensity_reference: dict | None = None,
                        split: Mapping[str, list[str]] | None = None) -> dict[str, Any]:
    """What `load_vqgan`, stage 2 and the CLIs need besides the weights."""
    return {"hparams": dict(model.hparams), "dataset": dataset, "intensity_reference": intensity_reference,
            "split": {name: list(ids) for name, ids in split.items()} if split is not None else None}


def save_vqgan(model: VQGAN, path: str | os.PathLike, *, dataset: dict | None = None,
               intensity_reference: dict | None = None, split: Mapping[str, list[str]] | None = None,
               overwrite: bool = False) -> Path:
    """Write a weights-only stage-1 file (no optimiser or discriminator state) that `load_vqgan` reads."""
    checkpoint = {
        "stage": STAGE,
        "vqgan": checkpoint_metadata(model, dataset=dataset, intensity_reference=intensity_reference, split=split),
        "state_dict": {STATE_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)
