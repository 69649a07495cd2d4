"""Building blocks of the stage-1 encoder and decoder: the residual block and the per-axis down/up-sampling layers
(a stride of 1 on an axis leaves that axis at full size; `layers.strides.per_level_strides` splits the factors)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from layers.norm import group_norm


class PreActResBlock(nn.Module):
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
