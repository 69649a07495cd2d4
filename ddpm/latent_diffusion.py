"""Latent semantic diffusion: the frozen stage-1 VQ-GAN, the denoising UNet and its EMA copy, the noise schedule
and the latent scale factor, with the training loss and label-to-image synthesis.

The diffusion runs on `scale_factor * vqgan.encode(image)` (the continuous latent before quantisation), scaled to
unit variance. `scale_factor` is a buffer, 1/std of training latents, set once by `set_scale_factor_from` and saved
with the weights, so sampling never depends on anyone remembering it. Decoding divides it out again and lets the
VQ-GAN quantise and decode. Nothing here depends on the stage-1 latent kind (`vqgan.kind`: ema_vq, fsq or kl):
`encode` gives that kind's continuous latent and `decode` its quantisation (nearest code, rounding, or none).
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from ddpm.conditioning import Condition, drop_labels
from ddpm.samplers import SamplerSettings, StepCallback, gaussian, guided, run_sampler
from ddpm.schedule import DiffusionSchedule
from ddpm.unet import UNet3D
from utils.build import configurable
from vq_gan_3d.model import VQGAN

LOSSES = ("l1", "l2")


def denoising_loss(unet: UNet3D, schedule: DiffusionSchedule, x0: torch.Tensor, label: torch.Tensor, *,
                   loss: str, cond_drop_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise x0 at uniformly drawn timesteps, predict the schedule's target from the label (replaced by the null
    condition at `cond_drop_prob` per sample), and return the L1 or L2 error."""
    source = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator, device=source).to(x0.device)
    noise = gaussian(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    label = drop_labels(label, unet.label_nc, cond_drop_prob, generator=generator)
    return per_sample_loss(unet, schedule, x0, label, t, noise, loss=loss).mean()


def per_sample_loss(unet: UNet3D, schedule: DiffusionSchedule, x0: torch.Tensor, label: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, *, loss: str) -> torch.Tensor:
    """(B,) L1 or L2 error of the prediction at the given timesteps and noise, one value per sample."""
    x_t = schedule.q_sample(x0, t, noise)
    prediction = unet(x_t, t, unet.condition(label)).float()
    target = schedule.training_target(x0, noise, t).float()
    error = (prediction - target).abs() if loss == "l1" else (prediction - target).square()
    return error.flatten(1).mean(1)


def make_optimizer(unet: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the UNet; the fused kernel updates every tensor in place (no per-step temporaries)."""
    return torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


@torch.no_grad()
def ema_update(ema: nn.Module, live: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * live with d = min(decay, (1 + step) / (10 + step)): the ramp keeps early
    averages from being dominated by the random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in live.parameters()], 1.0 - d)


def make_denoiser(unet: UNet3D, label: torch.Tensor, guidance_scale: float) -> Callable:
    """`denoise(x_t, t) -> model output` for the samplers: label features (and their SPADE maps) are computed
    once here and reused at every step; with guidance != 1 the conditional and the null-condition passes run as
    one batch."""
    condition: Condition = unet.condition(label, cache=True)
    if guidance_scale != 1.0:
        condition = condition.concat(unet.null_condition(label, cache=True))

    def evaluate(x_t: torch.Tensor, t: int) -> torch.Tensor:
        steps = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        return unet(x_t, steps, condition).float()  # guidance and sampler arithmetic in float32 under autocast

    return evaluate if guidance_scale == 1.0 else guided(evaluate, guidance_scale)


@torch.no_grad()
def sample(unet: UNet3D, schedule: DiffusionSchedule, label: torch.Tensor, latent_shape, *,
           settings: SamplerSettings, guidance_scale: float = 1.0, generator: torch.Generator | None = None,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Draw x0 of shape (B, *latent_shape) for the label maps (B, 1, ...) (on the image grid)."""
    noise = gaussian((label.shape[0], *latent_shape), generator=generator, device=label.device)
    denoise = make_denoiser(unet, label, guidance_scale)
    return run_sampler(settings, denoise, noise, schedule, generator=generator, callback=callback)


@configurable(exclude=("vqgan",))
class LatentDiffusion(nn.Module):
    """Built from `model.diffusion` (`utils.build.build`, with the trained `vqgan` and the data set's `label_nc`):
    `unet` holds the `UNet3D` arguments other than those the VQ-GAN and the data set fix (`in_channels`,
    `label_nc`, `label_downsample`). `hparams` (`utils.build.configurable`) is that node and `label_nc`, without
    the VQ-GAN, which checkpoints store next to `vqgan.hparams`."""

    def __init__(self, *, vqgan: VQGAN, label_nc: int, unet: dict[str, Any], timesteps: int, beta_schedule: str,
                 prediction: str, loss: str, cond_drop_prob: float, ema_decay: float):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if vqgan.is_spade and vqgan.label_nc != label_nc:
            raise ValueError(f"the stage-1 SPADE decoder knows {vqgan.label_nc} classes, the data set has {label_nc}")
        self.vqgan = vqgan.eval().requires_grad_(False)
        self.label_nc = label_nc
        self.unet = UNet3D(in_channels=vqgan.embedding_dim, label_nc=label_nc,
                           label_downsample=vqgan.downsample, **unet)
        self.ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.schedule = DiffusionSchedule(timesteps=timesteps, beta_schedule=beta_schedule, prediction=prediction)
        self.loss_kind = loss
        self.cond_drop_prob = cond_drop_prob
        self.ema_decay = ema_decay
        self.register_buffer("scale_factor", torch.tensor(float("nan")))

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Only the UNet ever trains: the VQ-GAN (its codebook updates in training mode) and the EMA copy stay
        in eval mode whatever Lightning asks of the parent module."""
        super().train(mode)
        self.vqgan.eval()
        self.ema_unet.eval()
        return self

    # latents -----------------------------------------------------------------------------------------------
    @property
    def image_multiple(self) -> tuple[int, int, int]:
        """Every side of an image (and label map) must be divisible by this, per axis."""
        return tuple(f * self.unet.required_multiple for f in self.vqgan.downsample)

    def check_image_size(self, shape) -> None:
        multiple = self.image_multiple
        if any(s % m for s, m in zip(shape, multiple)):
            raise ValueError(f"volume size {list(shape)} must be divisible by {list(multiple)} (stage-1 factor "
                             f"{list(self.vqgan.downsample)} x {self.unet.required_multiple} for the UNet levels)")

    @torch.no_grad()
    def encode_unscaled(self, image: torch.Tensor) -> torch.Tensor:
        return self.vqgan.encode(image)

    @property
    def has_scale_factor(self) -> bool:
        return bool(torch.isfinite(self.scale_factor))

    @torch.no_grad()
    def set_scale_factor_from(self, mean: float, mean_square: float) -> float:
        """1/std from the mean and mean square of unscaled training latents (over all elements)."""
        std = (mean_square - mean**2) ** 0.5
        if not std > 0:
            raise ValueError("training latents have zero variance: cannot compute the latent scale factor")
        self.scale_factor.fill_(1.0 / std)
        return float(self.scale_factor)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        if not self.has_scale_factor:
            raise RuntimeError("the latent scale factor is not set: call set_scale_factor_from() first")
        return self.encode_unscaled(image).float() * self.scale_factor  # diffusion maths in float32

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        z = latent / self.scale_factor
        return self.vqgan.decode(z, label if self.vqgan.is_spade else None)

    # training ----------------------------------------------------------------------------------------------
    def training_loss(self, image: torch.Tensor, label: torch.Tensor, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latent_training_loss(self.encode_unscaled(image), label, generator=generator)

    def latent_training_loss(self, latent: torch.Tensor, label: torch.Tensor, *,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoising loss on an unscaled stage-1 latent (encoded now, or read from the latent cache)."""
        if not self.has_scale_factor:
            raise RuntimeError("the latent scale factor is not set: call set_scale_factor_from() first")
        return denoising_loss(self.unet, self.schedule, latent.float() * self.scale_factor, label,
                              loss=self.loss_kind, cond_drop_prob=self.cond_drop_prob, generator=generator)

    def update_ema(self, step: int) -> None:
        ema_update(self.ema_unet, self.unet, self.ema_decay, step)

    # sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latent(self, label: torch.Tensor, *, settings: SamplerSettings, guidance_scale: float = 1.0,
                      generator: torch.Generator | None = None, use_ema: bool = True,
                      callback: StepCallback | None = None) -> torch.Tensor:
        """Label map (B, 1, X, Y, Z) on the image grid -> scaled latent sample (B, C, X/fx, Y/fy, Z/fz)."""
        if not self.has_scale_factor:
            raise RuntimeError("the latent scale factor is not set: this model was never fitted")
        self.check_image_size(label.shape[2:])
        if int(label.min()) < 0 or int(label.max()) >= self.label_nc:
            raise ValueError(f"label values must lie in [0, {self.label_nc}), got {int(label.min())}.."
                             f"{int(label.max())}")
        latent_shape = (self.unet.hparams["in_channels"],
                        *(s // f for s, f in zip(label.shape[2:], self.vqgan.downsample)))
        return sample(self.ema_unet if use_ema else self.unet, self.schedule, label, latent_shape,
                      settings=settings, guidance_scale=guidance_scale, generator=generator, callback=callback)

    @torch.no_grad()
    def synthesize(self, label: torch.Tensor, **sample_kwargs) -> torch.Tensor:
        """Label map -> image (B, 1, X, Y, Z) in the normalised range."""
        return self.decode(self.sample_latent(label, **sample_kwargs), label)
