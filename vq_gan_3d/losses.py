"""Stage-1 training objective: L1 + perceptual (slices or volume) + the latent kind's regulariser (commitment for
ema_vq, KL for kl, none for fsq) + hinge GAN from a 2D slice and a 3D patch discriminator + discriminator feature
matching.

One discriminator forward on [real; fake] serves both steps of an iteration: the generator loss back-propagates
through the fake half, the discriminator loss (computed from the same logits) only into the discriminators'
weights, and the detached real features are the feature-matching targets. Nothing is run twice.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vq_gan_3d.discriminators import PatchDiscriminator
from vq_gan_3d.perceptual import PerceptualLoss


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def feature_matching_loss(feats_real: list[torch.Tensor], feats_fake: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the L1 distance between fake features and (detached) real features."""
    return sum(F.l1_loss(fake, real.detach()) for real, fake in zip(feats_real, feats_fake)) / len(feats_real)


def lesion_l1(real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the voxels of `mask` (the whole batch's; 0 when it holds none). Lesions are a few
    hundred of a crop's voxels: in the plain L1 their errors hardly count, here they are the whole term."""
    mask = mask.to(fake.dtype)
    return ((fake - real).abs() * mask).sum() / mask.sum().clamp_min(1.0)


def sample_slices(volumes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) and per-volume slice indices (B, n) along Z -> (B * n, C, X, Y)."""
    b, c, x, y, _ = volumes.shape
    n = index.shape[1]
    gather = index.to(volumes.device).view(b, 1, 1, 1, n).expand(b, c, x, y, n)
    return volumes.gather(4, gather).permute(0, 4, 1, 2, 3).reshape(b * n, c, x, y)


def random_slice_index(batch: int, depth: int, n_slices: int, generator: torch.Generator) -> torch.Tensor:
    """n distinct Z indices per volume (all of them when n >= depth)."""
    n = min(n_slices, depth)
    return torch.stack([torch.randperm(depth, generator=generator)[:n] for _ in range(batch)])


@dataclass
class DiscriminatorPass:
    """Logits of the discriminators on [real; fake], kept between the generator and discriminator steps."""

    logits_real: list[torch.Tensor]
    logits_fake: list[torch.Tensor]


class VQGANLoss(nn.Module):
    def __init__(
        self,
        *,
        l1_weight: float,
        lesion_l1_weight: float = 0.0,
        perceptual_weight: float,
        perceptual_backbone: str,
        perceptual_path: str | None,
        slices_per_volume: int,
        gan_start_step: int,
        gan_weight_2d: float,
        gan_weight_3d: float,
        feature_matching_weight: float,
        disc_channels: int,
        disc_layers: int,
    ):
        super().__init__()
        self.l1_weight = l1_weight
        self.lesion_l1_weight = lesion_l1_weight
        self.perceptual_weight = perceptual_weight
        self.slices_per_volume = slices_per_volume
        self.gan_start_step = gan_start_step
        self.gan_weight_2d = gan_weight_2d
        self.gan_weight_3d = gan_weight_3d
        self.feature_matching_weight = feature_matching_weight
        # Loaded at construction, so a missing backbone stops the run at start-up.
        self.perceptual = (PerceptualLoss(backbone=perceptual_backbone, path=perceptual_path)
                           if perceptual_weight > 0 else None)
        self.disc_2d = (PatchDiscriminator(spatial_dims=2, channels=disc_channels, n_layers=disc_layers)
                        if gan_weight_2d > 0 else None)
        self.disc_3d = (PatchDiscriminator(spatial_dims=3, channels=disc_channels, n_layers=disc_layers)
                        if gan_weight_3d > 0 else None)

    def discriminators(self) -> list[nn.Module]:
        return [d for d in (self.disc_2d, self.disc_3d) if d is not None]

    def gan_active(self, step: int) -> bool:
        return step >= self.gan_start_step and bool(self.discriminators())

    def generator_loss(
        self, real: torch.Tensor, fake: torch.Tensor, regularizer: Mapping[str, torch.Tensor], step: int,
        generator: torch.Generator, lesion_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], DiscriminatorPass | None]:
        """Total generator loss, its logged terms, and the discriminator pass to reuse in the D step (None before
        the GAN starts). `regularizer` holds the latent's weighted loss terms (`info["regularizer"]` of the
        VQ-GAN: {"commitment": ...}, {"kl": ...} or {}), added as they are. `generator` draws the slices of the 2D
        losses. `lesion_mask` (bool, shaped like `real`) marks the lesion voxels of `lesion_l1_weight`'s term.
        """
        terms = {"l1": F.l1_loss(fake, real), **regularizer}
        total = self.l1_weight * terms["l1"] + sum(regularizer.values())
        if self.lesion_l1_weight > 0 and lesion_mask is not None:
            terms["lesion_l1"] = lesion_l1(real, fake, lesion_mask)
            total = total + self.lesion_l1_weight * terms["lesion_l1"]
        gan_on = self.gan_active(step)
        slices_needed = (self.perceptual is not None and self.perceptual.on_slices) or (
            gan_on and self.disc_2d is not None)
        real_2d = fake_2d = None
        if slices_needed:
            index = random_slice_index(real.shape[0], real.shape[-1], self.slices_per_volume, generator)
            real_2d, fake_2d = sample_slices(real, index), sample_slices(fake, index)
        if self.perceptual is not None:
            pair = (real_2d, fake_2d) if self.perceptual.on_slices else (real, fake)
            terms["perceptual"] = self.perceptual(*pair)
            total = total + self.perceptual_weight * terms["perceptual"]
        if not gan_on:
            return total, terms, None
        passes = DiscriminatorPass([], [])
        for name, disc, weight, r, f in (("2d", self.disc_2d, self.gan_weight_2d, real_2d, fake_2d),
                                         ("3d", self.disc_3d, self.gan_weight_3d, real, fake)):
            if disc is None:
                continue
            logits, feats = disc(torch.cat([r, f]))  # one pass over real and fake (instance norm: per sample)
            logits_real, logits_fake = logits.chunk(2)
            feats_real, feats_fake = zip(*(feat.chunk(2) for feat in feats))
            terms[f"g_adv_{name}"] = hinge_g_loss(logits_fake)
            terms[f"feature_matching_{name}"] = feature_matching_loss(list(feats_real), list(feats_fake))
            total = total + weight * (terms[f"g_adv_{name}"]
                                      + self.feature_matching_weight * terms[f"feature_matching_{name}"])
            passes.logits_real.append(logits_real)
            passes.logits_fake.append(logits_fake)
        return total, terms, passes

    def discriminator_loss(self, passes: DiscriminatorPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of each discriminator; back-propagate it into the discriminators' weights only."""
        terms, total = {}, 0.0
        names = [n for n, d in (("2d", self.disc_2d), ("3d", self.disc_3d)) if d is not None]
        for name, real, fake in zip(names, passes.logits_real, passes.logits_fake):
            terms[f"d_{name}"] = hinge_d_loss(real, fake)
            total = total + terms[f"d_{name}"]
        return total, terms
