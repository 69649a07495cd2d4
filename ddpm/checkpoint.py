"""The stage-2 checkpoint: everything sampling needs, with no training config and no stage-1 file.

Written by `train.lit_diffusion` (a Lightning checkpoint plus these keys):
- `"stage": "diffusion"`;
- `"diffusion"`: `{"model": LatentDiffusion.hparams, "vqgan": VQGAN.hparams, "stage1_kind": "ema_vq"|"fsq"|"kl",
  "dataset": {...}, "intensity_reference": {...}}`: network and schedule settings (the `model.diffusion` and
  stage-1 `model.vqgan` config nodes, `_target_` included; files without targets still load), the stage-1 latent
  kind the diffusion was trained on (it must agree with the stored stage-1 settings), the data set's grid and
  intensity settings (spacing, normalisation, label classes, modality) and the training-set reference intensity
  params that map generated volumes back to native units;
- `"state_dict"`: `model.*` weights (VQ-GAN, UNet, EMA UNet, latent `scale_factor`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ddpm.latent_diffusion import LatentDiffusion
from utils.checkpoint import load_weights, read_checkpoint, rebuild
from utils.errors import UserError
from vq_gan_3d.model import VQGAN, latent_kind

STAGE = "diffusion"
STATE_PREFIX = "model."


def checkpoint_metadata(model: LatentDiffusion, *, dataset: dict[str, Any],
                        intensity_reference: dict[str, Any] | None) -> dict[str, Any]:
    return {"model": dict(model.hparams), "vqgan": dict(model.vqgan.hparams), "stage1_kind": model.vqgan.kind,
            "dataset": dict(dataset),
            "intensity_reference": dict(intensity_reference) if intensity_reference else None}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_diffusion(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                   ) -> tuple[LatentDiffusion, dict[str, Any]]:
    """Rebuild the stage-2 model (eval mode, no gradients) from its checkpoint alone; returns it and the
    `"diffusion"` metadata. Any problem with the file is a one-line `UserError` naming it."""
    path = Path(path)
    checkpoint = read_checkpoint(path, STAGE, map_location=map_location,
                                 needed="sampling needs the last.ckpt/best.ckpt of a diffusion training run")
    meta = checkpoint[STAGE]
    if not {"model", "vqgan", "dataset"} <= set(meta):
        raise UserError(f"{path}: malformed stage-2 checkpoint (missing model settings)")
    recorded, stored = meta.get("stage1_kind"), latent_kind(meta["vqgan"])
    if recorded is not None and recorded != stored:  # checkpoints written before the kinds record none
        raise UserError(f"{path}: stage 2 was trained on a {recorded!r} stage-1 latent, but the stored stage-1 "
                        f"settings are of kind {stored!r}")
    vqgan = rebuild(path, STAGE, meta["vqgan"], [VQGAN])
    model = rebuild(path, STAGE, meta["model"], [LatentDiffusion], vqgan=vqgan)
    load_weights(model, checkpoint["state_dict"], STATE_PREFIX, path, "model")
    if not model.has_scale_factor:
        raise UserError(f"{path}: the latent scale factor was never computed (saved before training started)")
    return model.eval().requires_grad_(False), meta
