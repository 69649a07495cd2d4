"""How the label map enters the stage-2 UNet.

A label map (B, 1, X, Y, Z) of ints in [0, label_nc) lives on the image grid; the UNet works on the latent grid,
which is smaller by the stage-1 `downsample` factor per axis. One extra class index, `label_nc`, is the null
condition of classifier-free guidance: a label map filled with it means "no label", and the network learns what
to do with it because training replaces labels by it at rate `cond_drop_prob`.

- `spade` decoder: `LatentMaskCompressor` turns the label map into `mask_channels` dense channels on the latent grid.
  Its first layer is a convolution over the one-hot map with kernel = stride, computed as embedding look-ups
  (the one-hot map of 37 classes at image resolution is never built).
- `normal` decoder: `onehot_on_grid` gives the fraction of each class inside every latent voxel (an area resize
  of the one-hot map, again without building it at full size); the UNet concatenates it to its input.

`Condition` carries these features (once per volume) and, while sampling, a cache of the SPADE scale and shift
maps, which depend on the label only and so are computed at the first step and reused at every later one.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from layers.strides import per_level_strides



def null_label_like(label: torch.Tensor, label_nc: int) -> torch.Tensor:
    return torch.full_like(label, label_nc)


def drop_labels(label: torch.Tensor, label_nc: int, drop_prob: float, generator=None) -> torch.Tensor:
    """Replace the whole label map of each sample by the null condition with probability `drop_prob`."""
    if drop_prob <= 0:
        return label
    source = generator.device if generator is not None else label.device
    keep = torch.rand(label.shape[0], generator=generator, device=source).to(label.device) >= drop_prob
    keep = keep.reshape(-1, *([1] * (label.dim() - 1)))
    return torch.where(keep, label, null_label_like(label, label_nc))


def _squeeze_channel(label: torch.Tensor) -> torch.Tensor:
    if label.dim() == 5:
        if label.shape[1] != 1:
            raise ValueError(f"label maps must have one channel, got shape {list(label.shape)}")
        return label[:, 0].long()
    if label.dim() != 4:
        raise ValueError(f"label maps must be (B, 1, X, Y, Z), got shape {list(label.shape)}")
    return label.long()


def _check_divisible(label: torch.Tensor, factor: Sequence[int]) -> None:
    if any(size % f for size, f in zip(label.shape[1:], factor)):
        raise ValueError(f"label map size {list(label.shape[1:])} is not divisible by {list(factor)}")


def onehot_on_grid(label: torch.Tensor, num_classes: int, factor: Sequence[int]) -> torch.Tensor:
    """(B, 1, X, Y, Z) ints -> (B, num_classes, X/fx, Y/fy, Z/fz): the fraction of each class in every cell."""
    label = _squeeze_channel(label)
    _check_divisible(label, factor)
    fx, fy, fz = factor
    out = None
    for i, j, k in itertools.product(range(fx), range(fy), range(fz)):
        part = F.one_hot(label[:, i::fx, j::fy, k::fz], num_classes)
        out = part if out is None else out + part
    return out.movedim(-1, 1).float() / (fx * fy * fz)


class _SumOfRows(torch.autograd.Function):
    """`F.embedding_bag(rows, weight, mode="sum")` with a backward that adds each offset's gradient into its rows
    (one `index_add_` per offset): the built-in backward sorts every index and is ~7x slower on CPU (stage-2
    training step profile, issue 15)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.n_rows = weight.shape[0]
        return F.embedding_bag(rows, weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        grad_weight = grad.new_zeros(ctx.n_rows, grad.shape[1])
        for offset in range(rows.shape[1]):
            grad_weight.index_add_(0, rows[:, offset], grad)
        return None, grad_weight


class PatchEmbedding(nn.Module):
    """Conv3d over the one-hot label map with kernel = stride = `patch`, computed as a bag of embeddings:
    out[:, cell] = bias + sum over offsets o in the patch of weight[o, label[patch * cell + o]]."""

    def __init__(self, *, num_classes: int, out_channels: int, patch: Sequence[int]):
        super().__init__()
        self.patch = tuple(int(p) for p in patch)
        self.n_offsets = self.patch[0] * self.patch[1] * self.patch[2]
        self.num_classes = num_classes
        # Each output sums n_offsets rows (one active class per offset): scale like a conv's fan-in.
        self.weight = nn.Parameter(torch.randn(self.n_offsets * num_classes, out_channels) / self.n_offsets**0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        label = _squeeze_channel(label)
        _check_divisible(label, self.patch)
        b, x, y, z = label.shape
        px, py, pz = self.patch
        cells = label.reshape(b, x // px, px, y // py, py, z // pz, pz).permute(0, 1, 3, 5, 2, 4, 6)
        offsets = torch.arange(self.n_offsets, device=label.device) * self.num_classes
        rows = cells.reshape(-1, self.n_offsets) + offsets
        out = _SumOfRows.apply(rows, self.weight) + self.bias
        return out.reshape(b, x // px, y // py, z // pz, -1).movedim(-1, 1).contiguous()


class LatentMaskCompressor(nn.Module):
    """Label map on the image grid -> `out_channels` features on the latent grid (downsampled by `downsample`):
    a patch embedding for the first halving, strided 3x3x3 convolutions for the others, then a 3x3x3 output conv."""

    def __init__(self, *, num_classes: int, out_channels: int, hidden_channels: int, downsample: Sequence[int]):
        super().__init__()
        strides = per_level_strides(downsample)
        first = strides[0] if strides else (1, 1, 1)
        self.embed = PatchEmbedding(num_classes=num_classes, out_channels=hidden_channels, patch=first)
        layers: list[nn.Module] = []
        for stride in strides[1:]:
            layers += [nn.SiLU(), nn.Conv3d(hidden_channels, hidden_channels, 3, stride=stride, padding=1)]
        layers += [nn.SiLU(), nn.Conv3d(hidden_channels, out_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(label))


@dataclass
class Condition:
    """Label features for one batch on every UNet level (`levels[i]` at 1/2^i of the latent grid).

    `spade_cache` is None in training (the SPADE maps must carry gradients) and a dict while sampling, filled by
    the SPADE layers at their first call and reused afterwards: valid only while the label stays the same."""

    levels: list[torch.Tensor]
    spade_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None)

    @property
    def batch_size(self) -> int:
        return self.levels[0].shape[0]

    def concat(self, other: "Condition") -> "Condition":
        """Batch two conditions (e.g. the label and the null condition for guidance)."""
        levels = [torch.cat([a, b]) for a, b in zip(self.levels, other.levels)]
        cache = {} if self.spade_cache is not None or other.spade_cache is not None else None
        return Condition(levels=levels, spade_cache=cache)


def level_pyramid(features: torch.Tensor, n_levels: int) -> list[torch.Tensor]:
    """features, then its 2x average-pooled versions, one per UNet level."""
    levels = [features]
    for _ in range(n_levels - 1):
        levels.append(F.avg_pool3d(levels[-1], 2))
    return levels
