"""A tiny image-space diffusion model overfit on two-class phantoms whose background level varies per volume.

The labels and the bright class come from `test_ddpm_overfit` (boxes of class 1, intensity 0.5, on 12x12x8
crops); here the background (class 0) of each volume has its own level, drawn uniformly from BACKGROUND. The label
map does not say which level, so a sample is only coherent if the network makes the whole volume agree on one:
windows denoised apart pick different levels (a seam), windows blended at every step agree, and an inpainted
region must take the level of its known surroundings. Trained once per test session (about 15 s on one core).
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch

from ddpm.latent_diffusion import denoising_loss, ema_update
from ddpm.schedule import DiffusionSchedule
from ddpm.unet import UNet3D
from test_ddpm_overfit import INTENSITY, SHAPE, phantom_labels

BACKGROUND = (-0.8, -0.3)
BRIGHT = float(INTENSITY[1])
NOISE = 0.03
TRAIN_STEPS = 200


def phantom_images(labels: torch.Tensor, generator: torch.Generator, levels: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Class 1 at BRIGHT, class 0 at one level per volume (`levels`, or drawn), plus a little noise."""
    n = labels.shape[0]
    if levels is None:
        low, high = BACKGROUND
        levels = low + (high - low) * torch.rand(n, generator=generator)
    background = levels.reshape(n, 1, 1, 1, 1).expand(labels.shape)
    clean = torch.where(labels == 1, torch.full_like(background, BRIGHT), background)
    return clean + NOISE * torch.randn(labels.shape, generator=generator)


def wide_labels(n: int, generator: torch.Generator, tiles: int = 2) -> torch.Tensor:
    """Phantom label maps `tiles` crops wide along X (boxes in every crop)."""
    return torch.cat([phantom_labels(n, generator) for _ in range(tiles)], dim=2)


@lru_cache(maxsize=1)
def trained_phantom_model() -> tuple[UNet3D, DiffusionSchedule]:
    """(EMA UNet in eval mode, schedule), trained with the project's loss, condition dropout and EMA."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        unet = UNet3D(in_channels=1, label_nc=2, decoder="spade", base_channels=16, channel_mult=(1, 2),
                      num_res_blocks=1, attention_levels=(1,), head_channels=16, group_width=8, norm_groups=8,
                      mask_channels=8, mask_hidden_channels=8, spade_hidden_channels=16, label_downsample=(1, 1, 1))
        ema = copy.deepcopy(unet)
        schedule = DiffusionSchedule(timesteps=200, beta_schedule="cosine", prediction="v")
        optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-3)
        for step in range(TRAIN_STEPS):
            labels = phantom_labels(4, gen)
            loss = denoising_loss(unet, schedule, phantom_images(labels, gen), labels, loss="l2",
                                  cond_drop_prob=0.1, generator=gen)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema_update(ema, unet, 0.95, step)
        return ema.eval().requires_grad_(False), schedule
    finally:
        torch.set_num_threads(previous)


__all__ = ["BACKGROUND", "BRIGHT", "NOISE", "SHAPE", "phantom_images", "phantom_labels", "trained_phantom_model",
           "wide_labels"]
