"""The stage-2 checkpoint: everything sampling needs, with no training config and no stage-1 file.

Written by `train.lit_diffusion` (a Lightning checkpoint plus these keys):
- `"stage": "diffusion"`;
- `"diffusion"`: `{"model": LatentDiffusion.hparams, "vqgan": VQGAN.hparams, "dataset": {...},
  "intensity_reference": {...}}`: network and schedule settings, the data set's grid and intensity settings
  (spacing, normalisation, label classes, modality) and the training-set reference intensity params that map
  generated volumes back to native units;
- `"state_dict"`: `model.*` weights (VQ-GAN, UNet, EMA UNet, latent `scale_factor`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ddpm.latent_diffusion import LatentDiffusion
from utils.errors import UserError
from vq_gan_3d.model import VQGAN

STAGE = "diffusion"
STATE_PREFIX = "model."


def checkpoint_metadata(model: LatentDiffusion, *, dataset: dict[str, Any],
                        intensity_reference: dict[str, Any] | None) -> dict[str, Any]:
    return {"model": dict(model.hparams), "vqgan": dict(model.vqgan.hparams), "dataset": dict(dataset),
            "intensity_reference": dict(intensity_reference) if intensity_reference else None}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path, map_location) -> dict:
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if not path.is_file() or path.stat().st_size == 0:
        raise UserError(f"{path}: not a checkpoint file (empty or not a file)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for non-checkpoints; all mean the same to the user
        message = " ".join(str(err).split())[:120]
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {message})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: not a checkpoint of this project (no dictionary inside)")
    return checkpoint


def load_diffusion(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                   ) -> tuple[LatentDiffusion, dict[str, Any]]:
    """Rebuild the stage-2 model (eval mode, no gradients) from its checkpoint alone; returns it and the
    `"diffusion"` metadata. Any problem with the file is a one-line `UserError` naming it."""
    path = Path(path)
    checkpoint = _read(path, map_location)
    stage = checkpoint.get("stage")
    if stage != STAGE:
        what = "a stage-1 (VQ-GAN) checkpoint" if stage == "vqgan" else "not a stage-2 checkpoint of this project"
        raise UserError(f"{path}: {what}; sampling needs the last.ckpt/best.ckpt of a diffusion training run")
    meta, state = checkpoint.get("diffusion"), checkpoint.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict) or not {"model", "vqgan", "dataset"} <= set(meta):
        raise UserError(f"{path}: malformed stage-2 checkpoint (missing model settings or weights)")
    try:
        model = LatentDiffusion.from_hparams(meta["model"], VQGAN.from_hparams(meta["vqgan"]))
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{path}: malformed stage-2 checkpoint (cannot rebuild the model: {err})") from None
    weights = {k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:160]
        raise UserError(f"{path}: weights do not match the stored model settings ({first})") from None
    if not model.has_scale_factor:
        raise UserError(f"{path}: the latent scale factor was never computed (saved before training started)")
    return model.eval().requires_grad_(False), meta
