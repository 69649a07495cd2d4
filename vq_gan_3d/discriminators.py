"""PatchGAN discriminators (Isola et al. 2017) with instance norm (batch norm is unreliable at batch 1-2):
a 2D one for slices and a 3D one for whole crops. Both return (logits, features) for hinge and
feature-matching losses."""
from __future__ import annotations

import torch
from torch import nn

from layers.memory_format import like_weights

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class PatchDiscriminator(nn.Module):
    """`n_layers` stride-2 4x4(x4) convolutions doubling the width from `channels`, one stride-1 3x3(x3)
    convolution, then a 1-channel 3x3(x3) logit map. Stride-1 layers keep the size, so small crops still work."""

    def __init__(self, *, spatial_dims: int, in_channels: int = 1, channels: int = 64, n_layers: int = 3):
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv, norm = _CONV[spatial_dims], _INSTANCE_NORM[spatial_dims]
        act = lambda: nn.LeakyReLU(0.2, inplace=False)  # noqa: E731
        blocks = [nn.Sequential(conv(in_channels, channels, 4, stride=2, padding=1), act())]
        width = channels
        for _ in range(1, n_layers):
            blocks.append(nn.Sequential(conv(width, width * 2, 4, stride=2, padding=1, bias=False), norm(width * 2),
                                        act()))
            width *= 2
        blocks.append(nn.Sequential(conv(width, width * 2, 3, padding=1, bias=False), norm(width * 2), act()))
        self.blocks = nn.ModuleList(blocks)
        self.to_logits = conv(width * 2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0:
                x = like_weights(x, self.blocks[1][0].weight)
            features.append(x)
        return self.to_logits(x), features
