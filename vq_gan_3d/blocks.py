"""Building blocks shared by the stage-1 encoder and decoder: GroupNorm helper, residual blocks and the per-axis
down/up-sampling layers (a factor of 4 on X and Y but 2 on Z is two halvings of X and Y and one of Z)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def group_norm(channels: int, groups: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm whose group count always divides the channel count."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6, affine=affine)


def like_weights(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x` in the memory format of a (k x k x k) conv weight. A 1-channel input gives no format hint (its strides
    fit both layouts), so the first convolution would otherwise fall back to channels-first and every later
    channels-last layer would pay a layout copy."""
    if weight.dim() == 5 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last_3d):
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def per_level_strides(downsample: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split per-axis down-sampling factors (powers of two) into one stride triple per halving step.

    (4, 4, 2) -> [(2, 2, 2), (2, 2, 1)]: every axis halves at the first log2(factor) steps.
    """
    if len(downsample) != 3:
        raise ValueError(f"downsample needs one factor per axis (X, Y, Z), got {list(downsample)}")
    steps = []
    for factor in downsample:
        factor = int(factor)
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"downsample factors must be powers of two, got {list(downsample)}")
        steps.append(int(math.log2(factor)))
    n_levels = max(steps)
    return [tuple(2 if level < s else 1 for s in steps) for level in range(n_levels)]


class ResBlock(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> conv3, plus a (1x1 when the width changes) skip connection."""

    def __init__(self, *, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3x3 convolution; a stride of 1 on an axis leaves that axis at full size."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: Sequence[int]):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=tuple(stride), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Transposed convolution with kernel equal to stride: each voxel becomes a learned 2x2x2 (or 2x2x1) block.
    It has no overlapping kernels (no checkerboard) and costs a fraction of interpolate-then-convolve."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: Sequence[int]):
        super().__init__()
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, tuple(stride), stride=tuple(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
