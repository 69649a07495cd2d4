"""A continuous Gaussian latent with a KL penalty, as in the autoencoders of latent diffusion (Rombach et al. 2022)
and MAISI: the encoder outputs a mean and a log-variance per latent channel; training decodes a reparameterised
sample, encoding (and evaluation) uses the mean, and the generator loss adds `kl_weight` times the KL divergence
to a standard normal (summed over the latent elements of a volume, averaged over the batch).

The sample's noise is drawn from a generator seeded by the update count (and the rank), so a resumed run draws
exactly what an uninterrupted one would.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vq_gan_3d.quantizer import _distributed

LOGVAR_RANGE = (-30.0, 20.0)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element (nats)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


class GaussianLatent(nn.Module):
    """Encoder output (B, 2 * embedding_dim, ...) -> latent (B, embedding_dim, ...). forward(h) -> (z, info) with
    info `regularizer` {"kl": kl_weight * KL} and `stats` {`kl_per_element` (nats, unweighted), `posterior_std`
    (mean standard deviation)}; `quantize(z)` is the identity (nothing to quantise). Same interface as
    `quantizer.EMAVectorQuantizer`."""

    kind = "kl"
    initialized = True  # nothing to initialise

    def __init__(self, *, embedding_dim: int, kl_weight: float = 1e-6, seed: int = 0):
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.embedding_dim = embedding_dim
        self.encoder_channels = 2 * embedding_dim
        self.kl_weight = kl_weight
        self.seed = seed
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def moments(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = h.float().chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def latent(self, h: torch.Tensor) -> torch.Tensor:
        return self.moments(h)[0]

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return z, {"regularizer": {}, "stats": {}}

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.autocast(device_type=h.device.type, enabled=False):
            mean, logvar = self.moments(h)
            std = torch.exp(0.5 * logvar)
            z = mean
            if self.training:
                noise = torch.randn(mean.shape, generator=self._generator(mean.device), device=mean.device)
                z = mean + std * noise
                if torch.is_grad_enabled():
                    self.num_updates.add_(1)
            kl = gaussian_kl(mean, logvar).flatten(1).sum(1).mean()
            info = {
                "regularizer": {"kl": self.kl_weight * kl},
                "stats": {"kl_per_element": kl.detach() / mean[0].numel(), "posterior_std": std.detach().mean()},
            }
        return z, info

    def _generator(self, device: torch.device) -> torch.Generator:
        rank = dist.get_rank() if _distributed() else 0
        seed = (self.seed * 1_000_003 + int(self.num_updates)) * 1009 + rank
        return torch.Generator(device=device).manual_seed(seed)
