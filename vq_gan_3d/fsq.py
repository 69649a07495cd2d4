"""Finite scalar quantisation (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each latent channel i is squashed into a bounded range by a shifted tanh and rounded to one of `levels[i]`
integer levels, with straight-through gradients. The codebook is implicit: the product of the levels (1,000 for
[8, 5, 5, 5]), with nothing to learn, initialise, collapse or restart. Codes are the rounded values scaled into
[-1, 1] (level k of an L-level channel is (k - L // 2) / (L // 2)); a code's index is the mixed-radix number of
its levels.

`latent(h)` is the bounded, not yet rounded, value (what stage 2 diffuses); `quantize(z)` rounds it (clamped to the
valid levels, so any z, e.g. a diffusion sample, maps to a code). Usage is tracked over a window of training
steps, for the implicit codes and for the levels of each channel; under torch.distributed the counts are summed
over ranks first, so every rank holds the same statistics.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from vq_gan_3d.quantizer import NEVER, _distributed, perplexity, usage_fraction

BOUND_EPS = 1e-3  # keeps tanh's bound just outside the outermost level, so it is reached by rounding


class FiniteScalarQuantizer(nn.Module):
    """Quantise (B, len(levels), ...) latents per channel. forward(h) / quantize(z) -> (z_q, info) with info
    `indices` (B, ...) of the implicit codebook, `regularizer` {} (none is needed) and `stats`: `perplexity` of this
    batch's codes, `codebook_usage` and `level_usage` (fractions of codes and of all channels' levels used within
    the last `usage_window` training steps). Same interface as `quantizer.EMAVectorQuantizer`."""

    kind = "fsq"
    initialized = True  # nothing to initialise

    def __init__(self, *, levels: Sequence[int], usage_window: int = 100):
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"fsq_levels needs one entry of at least 2 levels per latent channel, got {levels}")
        if usage_window < 1:
            raise ValueError(f"usage_window must be at least 1 step, got {usage_window}")
        self.levels = levels
        self.embedding_dim = self.encoder_channels = len(levels)
        self.num_codes = math.prod(levels)
        self.usage_window = usage_window
        level = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("_half_width", (level // 2), persistent=False)
        self.register_buffer("_low", -(level // 2), persistent=False)  # lowest integer level
        self.register_buffer("_high", level - 1 - level // 2, persistent=False)
        self.register_buffer("_basis", torch.tensor([math.prod(levels[:i]) for i in range(len(levels))]),
                             persistent=False)
        self.register_buffer("_level_offset", torch.tensor([sum(levels[:i]) for i in range(len(levels))]),
                             persistent=False)
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("last_used", torch.full((self.num_codes,), NEVER, dtype=torch.long))
        self.register_buffer("level_last_used", torch.full((sum(levels),), NEVER, dtype=torch.long))

    def _per_channel(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1, *([1] * (like.dim() - 2)))

    def latent(self, h: torch.Tensor) -> torch.Tensor:
        """Encoder output -> bounded latent in about [-1, 1] (rounding it gives the code)."""
        h = h.float()
        level = self._per_channel(self._high - self._low + 1, h)
        half = (level - 1) * (1 + BOUND_EPS) / 2
        offset = torch.where(level % 2 == 0, 0.5, 0.0)
        bounded = torch.tanh(h + torch.atanh(offset / half)) * half - offset
        return bounded / self._per_channel(self._half_width, h)

    def integer_levels(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, D, ...) -> nearest valid integer level per channel (float, in [low, high])."""
        half = self._per_channel(self._half_width, z)
        return torch.maximum(torch.minimum(torch.round(z.float() * half), self._per_channel(self._high, z)),
                             self._per_channel(self._low, z))

    def codes_to_indices(self, levels: torch.Tensor) -> torch.Tensor:
        """Integer levels (B, D, ...) -> implicit codebook index (B, ...)."""
        digits = (levels - self._per_channel(self._low, levels)).long()
        return (digits * self._per_channel(self._basis, levels)).sum(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Implicit codebook index map (B, ...) -> code vectors (B, D, ...) in [-1, 1]."""
        shape = (1, -1, *([1] * (indices.dim() - 1)))
        digits = (indices.unsqueeze(1) // self._basis.view(shape)) % (self._high - self._low + 1).long().view(shape)
        return (digits.float() + self._low.view(shape)) / self._half_width.view(shape)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            levels = self.integer_levels(z.detach())
            z_q = levels / self._per_channel(self._half_width, z)
            indices = self.codes_to_indices(levels)
            digits = (levels - self._per_channel(self._low, levels)).long()
            level_ids = (digits + self._per_channel(self._level_offset, digits)).movedim(1, -1).reshape(-1)
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_codes).float()
            level_counts = torch.bincount(level_ids, minlength=self.level_last_used.numel()).float()
            if self.training and torch.is_grad_enabled():
                counts, level_counts = self._update_usage(counts, level_counts)
            step = int(self.num_updates)
            info = {
                "indices": indices,
                "regularizer": {},
                "stats": {
                    "perplexity": perplexity(counts),
                    "codebook_usage": usage_fraction(self.last_used, counts, step, self.usage_window),
                    "level_usage": usage_fraction(self.level_last_used, level_counts, step, self.usage_window),
                },
            }
            return z + (z_q - z).detach(), info  # straight-through estimator

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.quantize(self.latent(h))

    @torch.no_grad()
    def _update_usage(self, counts: torch.Tensor, level_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _distributed():
            both = torch.cat([counts, level_counts])
            dist.all_reduce(both)
            counts, level_counts = both.split([counts.numel(), level_counts.numel()])
        self.num_updates.add_(1)
        step = int(self.num_updates)
        self.last_used[counts > 0] = step
        self.level_last_used[level_counts > 0] = step
        return counts, level_counts
