"""Loading a trained stage 1 safely (`weights_only=True`) from the Lightning checkpoints of a VQ-GAN run.

A stage-1 checkpoint carries `"stage": "vqgan"`, `"vqgan": {"hparams": VQGAN.hparams, "dataset": {...},
"intensity_reference": {...} | None}` and the weights under `state_dict["vqgan.*"]` (the LightningModule's
attribute). Any problem with the file is a one-line `UserError` naming it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from utils.atomic import atomic_path
from utils.errors import UserError
from vq_gan_3d.model import VQGAN

STAGE = "vqgan"
STATE_PREFIX = "vqgan."


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict of a stage-1 run, with its stage and metadata checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle is a bad file
        reason = " ".join(str(err).split())[:120]
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: not a checkpoint of this project (expected a dict)")
    stage = checkpoint.get("stage")
    if stage != STAGE:
        what = ("a stage-2 (diffusion) checkpoint" if stage == "diffusion"
                else "not a checkpoint of this project (no stage entry)" if stage is None
                else f"a checkpoint of stage {stage!r}")
        raise UserError(f"{path}: {what}; expected the last.ckpt/best.ckpt of a VQ-GAN (stage-1) training run")
    meta, state = checkpoint.get("vqgan"), checkpoint.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(meta.get("hparams"), dict) or not isinstance(state, dict):
        raise UserError(f"{path}: malformed stage-1 checkpoint (missing VQ-GAN settings or weights)")
    return checkpoint


def load_vqgan(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VQGAN:
    """The trained VQ-GAN of a stage-1 checkpoint, in eval mode with `requires_grad=False`."""
    checkpoint = read_checkpoint(path, map_location)
    try:
        model = VQGAN.from_hparams(checkpoint["vqgan"]["hparams"])
    except (TypeError, ValueError, KeyError) as err:
        raise UserError(f"{path}: malformed stage-1 checkpoint (cannot rebuild the VQ-GAN: {err})") from None
    weights = {k[len(STATE_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: weights do not match the stored VQ-GAN settings ({first})") from None
    if not bool(model.quantizer.initialized):
        raise UserError(f"{path}: the codebook was never initialised (saved before the first training step)")
    model.to(map_location).eval().requires_grad_(False)
    return model


def checkpoint_metadata(model: VQGAN, *, dataset: dict | None = None,
                        intensity_reference: dict | None = None) -> dict[str, Any]:
    """What `load_vqgan` and the CLIs need besides the weights."""
    return {"hparams": dict(model.hparams), "dataset": dataset, "intensity_reference": intensity_reference}


def save_vqgan(model: VQGAN, path: str | os.PathLike, *, dataset: dict | None = None,
               intensity_reference: dict | None = None, overwrite: bool = False) -> Path:
    """Write a weights-only stage-1 file (no optimiser or discriminator state) that `load_vqgan` reads."""
    checkpoint = {
        "stage": STAGE,
        "vqgan": checkpoint_metadata(model, dataset=dataset, intensity_reference=intensity_reference),
        "state_dict": {STATE_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)
