"""3D convolutional encoder and decoder of the VQ-GAN (normal or SPADE decoder) and the optional mask compressor."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from layers.memory_format import like_weights
from layers.norm import SPADE, group_norm
from layers.strides import per_level_strides
from vq_gan_3d.blocks import Downsample, PreActResBlock, Upsample


def _level_channels(base_channels: int, channel_mult: Sequence[int], n_levels: int) -> list[int]:
    if len(channel_mult) != n_levels + 1:
        raise ValueError(
            f"channel_mult needs {n_levels + 1} entries (one per resolution level) for this downsample, "
            f"got {list(channel_mult)}"
        )
    return [base_channels * int(m) for m in channel_mult]


def _run_block(block: nn.Module, recompute: bool, *args: torch.Tensor) -> torch.Tensor:
    """Run a residual block; with `recompute` its activations are not stored but recomputed in backward."""
    if recompute and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def _blocks_per_level(num_res_blocks: int | Sequence[int], n_levels: int) -> list[int]:
    if isinstance(num_res_blocks, int):
        return [num_res_blocks] * (n_levels + 1)
    if len(num_res_blocks) != n_levels + 1:
        raise ValueError(f"num_res_blocks needs 1 or {n_levels + 1} entries, got {list(num_res_blocks)}")
    return [int(n) for n in num_res_blocks]


class Encoder(nn.Module):
    """image (B, C, X, Y, Z) -> z (B, embedding_dim, X/fx, Y/fy, Z/fz)."""

    def __init__(
        self,
        *,
        in_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        downsample: Sequence[int],
        embedding_dim: int,
        norm_groups: int,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        strides = per_level_strides(downsample)
        channels = _level_channels(base_channels, channel_mult, len(strides))
        blocks = _blocks_per_level(num_res_blocks, len(strides))
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        for level, ch in enumerate(channels):
            layers += [PreActResBlock(in_channels=ch, out_channels=ch, norm_groups=norm_groups)
                       for _ in range(blocks[level])]
            if level < len(strides):
                layers.append(Downsample(in_channels=ch, out_channels=channels[level + 1], stride=strides[level]))
        self.body = nn.ModuleList(layers)
        self.norm_out = group_norm(channels[-1], norm_groups)
        self.conv_out = nn.Conv3d(channels[-1], embedding_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        first = next((m.weight for m in self.body.modules() if isinstance(m, nn.Conv3d)), None)
        if first is not None:
            h = like_weights(h, first)
        for layer in self.body:
            h = _run_block(layer, self.gradient_checkpointing and isinstance(layer, PreActResBlock), h)
        return self.conv_out(F.silu(self.norm_out(h)))


class SPADEResBlock(nn.Module):
    """PreActResBlock whose GroupNorms are SPADE layers fed the label map."""

    def __init__(self, *, in_channels: int, out_channels: int, norm_groups: int, label_channels: int, hidden: int,
                 kernel_size: int = 3):
        super().__init__()
        spade = dict(label_channels=label_channels, hidden_channels=hidden, norm_groups=norm_groups, spatial_dims=3,
                     kernel_size=kernel_size)
        self.norm1 = SPADE(norm_channels=in_channels, **spade)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = SPADE(norm_channels=out_channels, **spade)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, label)))
        h = self.conv2(F.silu(self.norm2(h, label)))
        return self.skip(x) + h


class DecoderMaskCompressor(nn.Module):
    """Small conv net turning a one-hot label map (label_nc channels) into `out_channels` dense channels,
    so the many SPADE layers work on a narrow map instead of dozens of one-hot classes."""

    def __init__(self, *, label_nc: int, out_channels: int, hidden_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(label_nc, hidden_channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv3d(hidden_channels, out_channels, 3, padding=1),
        )

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.net(onehot)


class Decoder(nn.Module):
    """z_q (B, embedding_dim, ...) -> image. With `label_channels` set, every norm layer is SPADE and `forward`
    needs the (one-hot or compressed) label map."""

    def __init__(
        self,
        *,
        out_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        downsample: Sequence[int],
        embedding_dim: int,
        norm_groups: int,
        label_channels: int | None = None,
        spade_hidden: int = 32,
        spade_kernel_size: int = 3,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        strides = per_level_strides(downsample)
        channels = _level_channels(base_channels, channel_mult, len(strides))
        blocks = _blocks_per_level(num_res_blocks, len(strides))
        self.spade = label_channels is not None
        self.gradient_checkpointing = gradient_checkpointing

        def res_block(ch: int) -> nn.Module:
            if self.spade:
                return SPADEResBlock(in_channels=ch, out_channels=ch, norm_groups=norm_groups,
                                     label_channels=label_channels, hidden=spade_hidden,
                                     kernel_size=spade_kernel_size)
            return PreActResBlock(in_channels=ch, out_channels=ch, norm_groups=norm_groups)

        self.conv_in = nn.Conv3d(embedding_dim, channels[-1], 3, padding=1)
        layers: list[nn.Module] = []
        for level in reversed(range(len(channels))):
            layers += [res_block(channels[level]) for _ in range(blocks[level])]
            if level > 0:
                layers.append(Upsample(in_channels=channels[level], out_channels=channels[level - 1],
                                       stride=strides[level - 1]))
        self.body = nn.ModuleList(layers)
        if self.spade:
            self.norm_out = SPADE(norm_channels=channels[0], label_channels=label_channels,
                                  hidden_channels=spade_hidden, norm_groups=norm_groups, spatial_dims=3,
                                  kernel_size=spade_kernel_size)
        else:
            self.norm_out = group_norm(channels[0], norm_groups)
        self.conv_out = nn.Conv3d(channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.spade and label is None:
            raise ValueError("the SPADE decoder needs the label map")
        h = self.conv_in(z)
        for layer in self.body:
            if isinstance(layer, SPADEResBlock):
                h = _run_block(layer, self.gradient_checkpointing, h, label)
            else:
                h = _run_block(layer, self.gradient_checkpointing and isinstance(layer, PreActResBlock), h)
        h = self.norm_out(h, label) if self.spade else self.norm_out(h)
        return self.conv_out(F.silu(h))
