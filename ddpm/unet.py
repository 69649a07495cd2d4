"""The stage-2 denoiser: a 3D UNet over the stage-1 latent, conditioned on the timestep and on the label map.

Layout (Dhariwal & Nichol's UNet): `conv_in`, then per resolution level `num_res_blocks` residual blocks and a
2x downsampling of every axis; a middle of block, attention, block; then per level (coarsest first)
`num_res_blocks + 1` blocks, each fed one skip connection, and a 2x upsampling. Attention (PyTorch's
scaled-dot-product attention) runs after the blocks of the levels listed in `attention_levels` and in the middle.

Each residual block is `x + mlp(norm(spatial_conv(x)) * (1 + scale(t)) + shift(t))` (a ConvNeXt-style block):
a grouped 3x3x3 convolution does the spatial mixing, a pointwise MLP the channel mixing. With the paper's widths
(64 base channels, multipliers 1, 2, 4, 8) two full 3x3x3 convolutions per block would put ~100M parameters in
the deep levels (512 channels); this block keeps a 3D receptive field with 14.8M parameters in all
(`num_res_blocks=1`), which is what lets a training step fit in half the published code's memory.

`block=resnet` builds the published Med-LSDM block instead: `skip(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))
* (1 + scale(t)) + shift(t)))` with two dense convolutions of kernel `resnet_kernel` and both norms label-aware.
The published code's kernel is (1, 3, 3) on its (depth, height, width) layout, i.e. in-plane; here that is
(3, 3, 1) on (X, Y, Z): 39.7M parameters at the paper's widths with 37 classes (published: 37.9M); (3, 3, 3)
gives full 3D convolutions with three times the block weights (104M).

Conditioning (`decoder`): `spade` makes the norms of the middle and decoder blocks SPADE layers fed the compressed
label map (encoder blocks keep GroupNorm, they see only the noisy latent); `normal` concatenates the per-voxel
class fractions to the input and uses GroupNorm everywhere.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm.conditioning import Condition, LatentMaskCompressor, level_pyramid, onehot_on_grid
from layers.norm import SPADE, group_norm
from utils.build import configurable

DECODERS = ("spade", "normal")
BLOCKS = ("default", "resnet")


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(emb, (0, dim % 2))


class Pointwise(nn.Module):
    """1x1x1 convolution as a batched matrix product over the flattened voxels: no weight reordering per call;
    on CPU as fast as Conv3d with kernel 1 or up to 30% faster (measured on this block's shapes)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # Conv3d's default
        bound = 1 / math.sqrt(in_channels)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        out = torch.baddbmm(self.bias[None, :, None], self.weight.expand(b, -1, -1), x.reshape(b, c, -1))
        return out.view(b, -1, *spatial)


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (at least 1)."""
    return next(d for d in range(max(1, min(n, at_most)), 0, -1) if n % d == 0)


def grouped_conv(channels: int, group_width: int, stride: int = 1) -> nn.Conv3d:
    """3x3x3 convolution in groups of at least `group_width` channels (the most groups that divide evenly)."""
    groups = largest_divisor(channels, channels // group_width)
    return nn.Conv3d(channels, channels, 3, stride=stride, padding=1, groups=groups)


class LabelNorm(nn.Module):
    """GroupNorm, or SPADE modulated by the label features of this level. While sampling, the SPADE scale and
    shift maps are taken from (or put into) the condition's cache under this layer's index."""

    def __init__(self, channels: int, *, norm_groups: int, spade: dict | None, index: int):
        super().__init__()
        self.index = index
        self.spade = SPADE(norm_channels=channels, norm_groups=norm_groups, **spade) if spade else None
        self.norm = None if spade else group_norm(channels, norm_groups)

    def forward(self, x: torch.Tensor, features: torch.Tensor | None, cache: dict | None) -> torch.Tensor:
        if self.spade is None:
            return self.norm(x)
        if cache is None:
            return self.spade(x, features)
        if self.index not in cache:
            # SPADE(x) = norm(x) * (1 + gamma(label)) + beta(label): only the maps depend on the label.
            hidden = self.spade.shared(features.to(x.dtype))
            cache[self.index] = (1 + self.spade.to_gamma(hidden), self.spade.to_beta(hidden))
        scale, shift = cache[self.index]
        return torch.addcmul(shift, self.spade.norm(x), scale)


class ConvNeXtBlock(nn.Module):
    """x + mlp(modulate(norm(spatial(x)), t)); when the width changes (decoder blocks fed a skip connection),
    x is first projected to the output width, so the block itself always runs at `out_channels`. `norms` hands
    out the SPADE cache index of each label-aware norm."""

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, group_width: int,
                 expansion: int, norm_groups: int, dropout: float, spade: dict | None, norms: Iterator[int]):
        super().__init__()
        self.project = nn.Identity() if in_channels == out_channels else Pointwise(in_channels, out_channels)
        self.spatial = grouped_conv(out_channels, group_width)
        self.norm = LabelNorm(out_channels, norm_groups=norm_groups, spade=spade, index=next(norms))
        self.time = nn.Linear(temb_channels, 2 * out_channels)
        hidden = expansion * out_channels
        self.mlp = nn.Sequential(Pointwise(out_channels, hidden), nn.SiLU(), nn.Dropout(dropout),
                                 zero_init(Pointwise(hidden, out_channels)))

    def forward(self, x, temb, features=None, cache=None):
        x = self.project(x)
        scale, shift = self.time(F.silu(temb))[..., None, None, None].chunk(2, dim=1)
        h = self.norm(self.spatial(x), features, cache)
        return x + self.mlp(torch.addcmul(shift, h, 1 + scale))


class ConvResBlock(nn.Module):
    """The published code's residual block (`block=resnet`): two dense convolutions of `kernel_size`, the time
    embedding as scale and shift after the second norm, a (pointwise when the width changes) skip connection."""

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, kernel_size: Sequence[int],
                 norm_groups: int, dropout: float, spade: dict | None, norms: Iterator[int]):
        super().__init__()
        kernel = tuple(kernel_size)
        padding = tuple(k // 2 for k in kernel)
        self.norm1 = LabelNorm(in_channels, norm_groups=norm_groups, spade=spade, index=next(norms))
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, padding=padding)
        self.norm2 = LabelNorm(out_channels, norm_groups=norm_groups, spade=spade, index=next(norms))
        self.time = nn.Linear(temb_channels, 2 * out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv3d(out_channels, out_channels, kernel, padding=padding))
        self.skip = nn.Identity() if in_channels == out_channels else Pointwise(in_channels, out_channels)

    def forward(self, x, temb, features=None, cache=None):
        scale, shift = self.time(F.silu(temb))[..., None, None, None].chunk(2, dim=1)
        h = self.conv1(F.silu(self.norm1(x, features, cache)))
        h = torch.addcmul(shift, self.norm2(h, features, cache), 1 + scale)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class Attention(nn.Module):
    """Multi-head self-attention over all voxels of a level, with a residual connection."""

    def __init__(self, channels: int, *, head_channels: int, norm_groups: int):
        super().__init__()
        self.heads = largest_divisor(channels, channels // head_channels)
        self.norm = group_norm(channels, norm_groups)
        self.qkv = Pointwise(channels, 3 * channels)
        self.proj = zero_init(Pointwise(channels, channels))

    def forward(self, x, temb=None, features=None, cache=None):
        b, c, *spatial = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, *spatial))


class Downsample(nn.Module):
    def __init__(self, channels: int, group_width: int):
        super().__init__()
        self.conv = grouped_conv(channels, group_width, stride=2)

    def forward(self, x, temb=None, features=None, cache=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, group_width: int):
        super().__init__()
        self.conv = grouped_conv(channels, group_width)

    def forward(self, x, temb=None, features=None, cache=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def check_settings(*, decoder: str, block: str, resnet_kernel: Sequence[int], n_levels: int,
                   attention_levels: Sequence[int]) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    kernel = [int(k) for k in resnet_kernel]
    if len(kernel) != 3 or any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"resnet_kernel needs three odd sizes (X, Y, Z), got {kernel}")
    if any(not 0 <= level < n_levels for level in attention_levels):
        raise ValueError(f"attention_levels must index the {n_levels} levels, got {list(attention_levels)}")


@configurable()
class UNet3D(nn.Module):
    """`forward(x_t, t, condition) -> prediction` with x_t (B, in_channels, X, Y, Z) on the latent grid (each side
    divisible by `required_multiple`), t (B,) timesteps, and a `Condition` from `condition(label)`, where `label`
    is (B, 1, X*fx, Y*fy, Z*fz) ints on the image grid (`label_downsample` = the stage-1 factor per axis) and may
    hold the null class `label_nc`."""

    def __init__(self, *, in_channels: int, label_nc: int, decoder: str = "spade", block: str = "default",
                 resnet_kernel: Sequence[int] = (3, 3, 1), base_channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 1,
                 attention_levels: Sequence[int] = (2, 3), head_channels: int = 64, group_width: int = 16,
                 expansion: int = 2, norm_groups: int = 32, dropout: float = 0.0,
                 mask_channels: int = 64, mask_hidden_channels: int = 32, spade_hidden_channels: int = 64,
                 spade_kernel_size: int = 1, label_downsample: Sequence[int] = (4, 4, 4),
                 gradient_checkpointing: bool = False):
        super().__init__()
        check_settings(decoder=decoder, block=block, resnet_kernel=resnet_kernel, n_levels=len(channel_mult),
                       attention_levels=attention_levels)
        self.label_nc = label_nc
        self.decoder = decoder
        self.n_levels = len(channel_mult)
        self.label_downsample = tuple(int(f) for f in label_downsample)
        self.gradient_checkpointing = gradient_checkpointing
        channels = [base_channels * int(m) for m in channel_mult]
        temb = base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, 4 * temb), nn.SiLU(), nn.Linear(4 * temb, temb))

        n_classes = label_nc + 1  # + the null condition
        if decoder == "spade":
            self.mask_compressor = LatentMaskCompressor(num_classes=n_classes, out_channels=mask_channels,
                                                        hidden_channels=mask_hidden_channels,
                                                        downsample=label_downsample)
            spade = dict(label_channels=mask_channels, hidden_channels=spade_hidden_channels,
                         kernel_size=spade_kernel_size)
            input_channels = in_channels
        else:
            self.mask_compressor = None
            spade = None
            input_channels = in_channels + n_classes
        common = dict(temb_channels=temb, norm_groups=norm_groups, dropout=dropout, norms=itertools.count())
        kernel = [int(k) for k in resnet_kernel]

        def res_block(in_ch: int, out_ch: int, spade_settings: dict | None) -> nn.Module:
            if block == "resnet":
                return ConvResBlock(in_channels=in_ch, out_channels=out_ch, kernel_size=kernel,
                                    spade=spade_settings, **common)
            return ConvNeXtBlock(in_channels=in_ch, out_channels=out_ch, group_width=group_width,
                                 expansion=expansion, spade=spade_settings, **common)

        attention = dict(head_channels=head_channels, norm_groups=norm_groups)
        # Built in this order (the order of the random initialisation): input conv, encoder, middle, decoder.
        self.conv_in = nn.Conv3d(input_channels, channels[0], 3, padding=1)
        skips = self._build_encoder(channels, num_res_blocks, attention_levels, res_block, attention, group_width)
        ch = channels[-1]
        self.middle = nn.ModuleList([res_block(ch, ch, spade), Attention(ch, **attention), res_block(ch, ch, spade)])
        self._build_decoder(channels, num_res_blocks, attention_levels, skips, lambda i, o: res_block(i, o, spade),
                            attention, group_width)
        self.norm_out = group_norm(channels[0], norm_groups)
        self.conv_out = zero_init(nn.Conv3d(channels[0], in_channels, 3, padding=1))

    def _build_encoder(self, channels: list[int], num_res_blocks: int, attention_levels: Sequence[int],
                       res_block: Callable, attention: dict, group_width: int) -> list[int]:
        """`down`: per level `num_res_blocks` blocks (GroupNorm: the encoder sees only the noisy latent), the
        level's attention, a downsampling. Returns the widths of the skips, pushed by the input conv, every
        block (after its level's attention for the last one) and every downsampling; the decoder consumes them
        in reverse, one per block."""
        self.down: nn.ModuleList = nn.ModuleList()
        self.down_pushes_skip: list[bool] = []
        skips = [channels[0]]
        ch = channels[0]
        for level, width in enumerate(channels):
            attend = level in attention_levels
            for i in range(num_res_blocks):
                self.down.append(res_block(ch, width, None))
                self.down_pushes_skip.append(not (attend and i == num_res_blocks - 1))
                ch = width
                skips.append(ch)
            if attend:
                self.down.append(Attention(ch, **attention))
                self.down_pushes_skip.append(True)
            if level < len(channels) - 1:
                self.down.append(Downsample(ch, group_width))
                self.down_pushes_skip.append(True)
                skips.append(ch)
        return skips

    def _build_decoder(self, channels: list[int], num_res_blocks: int, attention_levels: Sequence[int],
                       skips: list[int], res_block: Callable, attention: dict, group_width: int) -> None:
        """`up`: per level (coarsest first) `num_res_blocks + 1` label-aware blocks, each fed one skip, the
        level's attention, an upsampling."""
        self.up: nn.ModuleList = nn.ModuleList()
        self.up_levels: list[int] = []
        self.up_takes_skip: list[bool] = []
        ch = channels[-1]
        for level in reversed(range(len(channels))):
            for _ in range(num_res_blocks + 1):
                self.up.append(res_block(ch + skips.pop(), channels[level]))
                self.up_levels.append(level)
                self.up_takes_skip.append(True)
                ch = channels[level]
            if level in attention_levels:
                self.up.append(Attention(ch, **attention))
                self.up_levels.append(level)
                self.up_takes_skip.append(False)
            if level > 0:
                self.up.append(Upsample(ch, group_width))
                self.up_levels.append(level)
                self.up_takes_skip.append(False)

    @property
    def required_multiple(self) -> int:
        """Every side of the latent must be divisible by this (one halving per level transition)."""
        return 2 ** (self.n_levels - 1)

    # conditioning ----------------------------------------------------------------------------------------------
    def condition(self, label: torch.Tensor, *, cache: bool = False) -> Condition:
        """Label features for every level, computed once per label map. `cache=True` (sampling, no gradients)
        also memoises the SPADE maps across denoising steps."""
        if self.decoder == "spade":
            features = self.mask_compressor(label)
        else:
            features = onehot_on_grid(label, self.label_nc + 1, self.label_downsample)
        levels = level_pyramid(features, self.n_levels if self.decoder == "spade" else 1)
        return Condition(levels=levels, spade_cache={} if cache else None)

    def null_condition(self, label_like: torch.Tensor, *, cache: bool = False) -> Condition:
        return self.condition(torch.full_like(label_like, self.label_nc), cache=cache)

    # forward ----------------------------------------------------------------------------------------------------
    def _run(self, layer: nn.Module, h, temb, features, cache):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(layer, h, temb, features, None, use_reentrant=False)
        return layer(h, temb, features, cache)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        if any(s % self.required_multiple for s in x.shape[2:]):
            raise ValueError(f"latent size {list(x.shape[2:])} must be divisible by {self.required_multiple} "
                             f"on every axis for {self.n_levels} levels")
        if condition.batch_size != x.shape[0]:
            raise ValueError(f"condition batch {condition.batch_size} != latent batch {x.shape[0]}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))
        cache = condition.spade_cache
        if self.decoder == "normal":
            x = torch.cat([x, condition.levels[0].to(x.dtype)], dim=1)
        h = self.conv_in(x)
        skips = [h]
        for layer, pushes_skip in zip(self.down, self.down_pushes_skip):
            h = self._run(layer, h, temb, None, None)
            if pushes_skip:
                skips.append(h)
        features = self._level_features(condition, self.n_levels - 1)
        for layer in self.middle:
            h = self._run(layer, h, temb, features, cache)
        for layer, level, takes_skip in zip(self.up, self.up_levels, self.up_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layer, h, temb, self._level_features(condition, level), cache)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _level_features(self, condition: Condition, level: int) -> torch.Tensor | None:
        return condition.levels[level] if self.decoder == "spade" else None
