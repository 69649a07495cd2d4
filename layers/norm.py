"""Normalisation layers of both stages: `group_norm` (GroupNorm whose group count divides the channel count) and
SPADE (spatially-adaptive normalisation, Park et al. 2019: normalise features without affine parameters, then
scale and shift them voxel by voxel with maps predicted from the label map), used by the stage-1 SPADE decoder
and by the stage-2 UNet decoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def group_norm(channels: int, groups: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm whose group count always divides the channel count."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6, affine=affine)


class SPADE(nn.Module):
    """out = norm(x) * (1 + gamma(label)) + beta(label).

    `label` is a float map with `label_channels` channels (one-hot classes or a compressed label map) at any
    resolution; it is resized (nearest) to the spatial size of `x` here, so callers pass the same map to every level.
    """

    def __init__(
        self,
        *,
        norm_channels: int,
        label_channels: int,
        hidden_channels: int = 64,
        spatial_dims: int = 3,
        norm_groups: int = 32,
        kernel_size: int = 3,
    ):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        conv = _CONV[spatial_dims]
        pad = kernel_size // 2
        self.spatial_dims = spatial_dims
        self.norm = group_norm(norm_channels, norm_groups, affine=False)
        self.shared = nn.Sequential(conv(label_channels, hidden_channels, kernel_size, padding=pad), nn.SiLU())
        self.to_gamma = conv(hidden_channels, norm_channels, kernel_size, padding=pad)
        self.to_beta = conv(hidden_channels, norm_channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if label.shape[2:] != x.shape[2:]:
            label = F.interpolate(label, size=x.shape[2:], mode="nearest")
        hidden = self.shared(label.to(x.dtype))
        return self.norm(x) * (1 + self.to_gamma(hidden)) + self.to_beta(hidden)
