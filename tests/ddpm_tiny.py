"""Tiny stage-1 and stage-2 models for the ddpm tests (CPU, milliseconds per step)."""
from __future__ import annotations

from pathlib import Path

import torch

from ddpm.checkpoint import checkpoint_metadata
from ddpm.latent_diffusion import LatentDiffusion
from vq_gan_3d.checkpoint import save_vqgan
from vq_gan_3d.model import VQGAN


TINY_UNET = dict(decoder="spade", base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                 head_channels=8, group_width=8, expansion=2, norm_groups=4, dropout=0.0, mask_channels=4,
                 mask_hidden_channels=4, spade_hidden_channels=8, spade_kernel_size=1, gradient_checkpointing=False)


def tiny_vqgan(label_nc: int | None = None, seed: int = 0) -> VQGAN:
    """x2 per axis, 4-dim latent, 32 codes; codebook initialised from one batch (as training does)."""
    torch.manual_seed(seed)
    vqgan = VQGAN(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, downsample=(2, 2, 2), embedding_dim=4,
                  num_codes=32, norm_groups=4, label_nc=label_nc, spade_hidden=4)
    vqgan.train()
    label = torch.randint(0, label_nc, (2, 1, 8, 8, 8)) if label_nc else None
    vqgan(torch.rand(2, 1, 8, 8, 8) * 2 - 1, label)
    return vqgan.eval().requires_grad_(False)


def save_tiny_vqgan(path: Path, label_nc: int | None = None) -> Path:
    return save_vqgan(tiny_vqgan(label_nc), path)


def tiny_diffusion(label_nc: int = 3, decoder: str = "spade", vqgan_label_nc: int | None = None,
                   scale_factor: float | None = 1.7) -> LatentDiffusion:
    torch.manual_seed(1)
    model = LatentDiffusion(vqgan=tiny_vqgan(vqgan_label_nc), label_nc=label_nc,
                            unet={**TINY_UNET, "decoder": decoder}, timesteps=50, beta_schedule="cosine",
                            prediction="v", loss="l2", cond_drop_prob=0.1, ema_decay=0.9)
    # A fresh UNet's output layer is zero: give every zero weight a value so predictions depend on inputs.
    with torch.no_grad():
        for p in list(model.unet.parameters()) + list(model.ema_unet.parameters()):
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.1)
    if scale_factor is not None:
        model.scale_factor.fill_(scale_factor)
    return model.eval()


def save_tiny_diffusion(path: Path, model: LatentDiffusion, *, modality: str = "mr",
                        spacing=(2.0, 2.0, 2.0)) -> Path:
    """A stage-2 checkpoint as the Lightning module writes it (metadata + `model.*` weights)."""
    intensity = ({"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0} if modality == "ct"
                 else {"kind": "percentile", "lower": 0.5, "upper": 99.5})
    dataset = {"name": "tiny", "modality": modality, "label_nc": model.label_nc, "class_names": None,
               "spacing": list(spacing), "crop_size": [16, 16, 8], "intensity": intensity}
    reference = {"kind": "percentile", "low": 10.0, "high": 500.0} if modality == "mr" else None
    torch.save({"stage": "diffusion", "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "diffusion": checkpoint_metadata(model, dataset=dataset, intensity_reference=reference)}, path)
    return path
