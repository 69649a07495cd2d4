"""Whole volumes through networks trained on crops: overlapping windows whose outputs are blended.

The stage-2 UNet and the stage-1 encoder/decoder are convolutional but were trained on crops, and their memory
grows with the input. Here every network call sees one window at a time and the overlapping outputs are
averaged with weights that fall off towards the window edges, so peak memory depends on the window, not on
the volume. The windows and their weights are `layers.tiling.TileGrid` (sin^2 ramps over the shared voxels), the
one scheme of every tiled network call in both stages (tiled stage-1 encode/decode live there too):

- `WindowedDenoiser`: `denoise(x_t, t)` for the samplers that, at every step, runs the UNet window by window
  (label map cropped per window, conditional and unconditional passes batched) and blends the predictions, so
  the whole latent is denoised jointly rather than stitched afterwards.
- `parse_window` / `checkpoint_window`: the `window=` setting of the CLIs, checked against the UNet.

A window at least as large as the volume is the plain network call: the result is bitwise the same.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ddpm.samplers import Denoiser
from layers.tiling import TileGrid, Triple, window_weight
from utils.errors import UserError


WHOLE = "whole"
WHOLE_SIDE = 1 << 20  # window side of `window=whole`: larger than any latent (windows are clamped to it)


def parse_window(value) -> tuple[int, int, int] | None:
    """`window=` of the CLIs: null (the checkpoint's default), `whole` (one window covering the latent), one
    positive integer for every axis, or three (latent voxels X, Y, Z)."""
    if value is None:
        return None
    if value == WHOLE:
        return (WHOLE_SIDE,) * 3
    values = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise UserError(f"window={value}: expected null, whole, a positive integer or 3 positive integers (latent "
                        f"voxels)")
    return tuple(values)


def checkpoint_window(window: Sequence[int] | None, model, meta: dict) -> tuple[int, int, int]:
    """`window` checked against the UNet (each side a multiple of its `required_multiple`), or by default the
    latent of the training crop stored in the checkpoint (`crop_size` / stage-1 factor, rounded down to that
    multiple): the size the network was trained on."""
    multiple = model.unet.required_multiple
    if window is None:
        crop = meta["dataset"]["crop_size"]
        return tuple(max(multiple, int(c) // f // multiple * multiple) for c, f in zip(crop, model.vqgan.downsample))
    if any(int(w) % multiple for w in window):
        raise UserError(f"window={list(window)}: every side must be a multiple of {multiple} latent voxels (the "
                        f"UNet halves it {model.unet.n_levels - 1} times)")
    return tuple(int(w) for w in window)


# the denoiser ------------------------------------------------------------------------------------------------
class WindowedDenoiser:
    """`denoise(x_t, t)` over a latent of any size: every call runs the network on the windows of `grid` and
    blends the outputs.

    `denoiser_for(label_crops)` builds the denoiser of a batch of windows from their crops of the label map (on
    the image grid, `factor` times the latent grid, stacked along the batch axis window by window);
    `windows_per_call` windows go through the network together (faster for small windows, memory grows with
    it). The denoiser of a single window covering the latent is built once, so its label features and SPADE
    maps are reused at every step as in whole-volume sampling; several windows get theirs rebuilt at every step
    (memory stays that of one call) unless `keep_conditions` (faster, memory grows with the number of windows).
    The label map may live on another device (the CPU) than the latent: only crops are moved."""

    def __init__(self, denoiser_for: Callable[[torch.Tensor], Denoiser], label: torch.Tensor, grid: TileGrid, *,
                 factor: Sequence[int], windows_per_call: int = 1, keep_conditions: bool = False):
        if windows_per_call < 1:
            raise ValueError(f"windows_per_call must be at least 1, got {windows_per_call}")
        self.denoiser_for = denoiser_for
        self.label = label
        self.grid = grid
        label_grid = grid.scaled(factor)
        if tuple(label.shape[2:]) != tuple(label_grid.shape):
            raise ValueError(f"label map {list(label.shape[2:])} does not match the latent {list(grid.shape)} "
                             f"x factor {list(factor)}")
        self.label_slices = {corner: label_grid.slices(label_corner)
                             for corner, label_corner in zip(grid.corners(), label_grid.corners())}
        corners = list(grid.corners())
        self.groups = [tuple(corners[i:i + windows_per_call]) for i in range(0, len(corners), windows_per_call)]
        self.keep_conditions = keep_conditions or grid.is_single
        self._kept: dict[tuple[Triple, ...], Denoiser] = {}
        self._tables: tuple[list, torch.device] | None = None
        self.max_call_voxels = 0  # the most latent voxels of one network call (per sample), for tests/benchmarks

    def group_denoiser(self, group: tuple[Triple, ...], device) -> Denoiser:
        if group in self._kept:
            return self._kept[group]
        crops = torch.cat([self.label[(..., *self.label_slices[corner])] for corner in group]).to(device)
        denoise = self.denoiser_for(crops)
        if self.keep_conditions:
            self._kept[group] = denoise
        return denoise

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        if tuple(x_t.shape[2:]) != self.grid.shape:
            raise ValueError(f"latent {list(x_t.shape[2:])} is not the grid's {list(self.grid.shape)}")
        window_voxels = math.prod(self.grid.size)
        if self.grid.is_single:
            self.max_call_voxels = max(self.max_call_voxels, window_voxels)
            return self.group_denoiser(self.groups[0], x_t.device)(x_t, t)
        if self._tables is None or self._tables[1] != x_t.device:
            self._tables = (self.grid.weight_tables(device=x_t.device), x_t.device)
        out = torch.zeros(x_t.shape, device=x_t.device, dtype=torch.float32)
        batch = x_t.shape[0]
        for group in self.groups:
            self.max_call_voxels = max(self.max_call_voxels, window_voxels * len(group))
            windows = torch.cat([x_t[(..., *self.grid.slices(corner))] for corner in group])
            predictions = self.group_denoiser(group, x_t.device)(windows, t).float()
            for i, corner in enumerate(group):
                out[(..., *self.grid.slices(corner))] += (predictions[i * batch:(i + 1) * batch]
                                                          * window_weight(self._tables[0], corner))
        return out


def unet_window_denoiser(unet, label: torch.Tensor, *, window: Sequence[int], overlap: float,
                         guidance_scale: float = 1.0, windows_per_call: int = 1,
                         keep_conditions: bool = False) -> WindowedDenoiser:
    """The stage-2 UNet as a windowed denoiser over the latent of `label` (B, 1, X, Y, Z) (image grid)."""
    from ddpm.latent_diffusion import make_denoiser  # the model module imports this one

    factor = tuple(unet.label_downsample)
    latent = [s // f for s, f in zip(label.shape[2:], factor)]
    grid = TileGrid.covering(latent, window, overlap, multiple=unet.required_multiple)
    return WindowedDenoiser(lambda crops: make_denoiser(unet, crops, guidance_scale), label, grid, factor=factor,
                            windows_per_call=windows_per_call, keep_conditions=keep_conditions)
