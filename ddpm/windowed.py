"""Whole volumes through networks trained on crops: overlapping windows whose outputs are blended.

The stage-2 UNet and the stage-1 encoder/decoder are convolutional but were trained on crops, and their memory
grows with the input. Here every network call sees one window at a time and the overlapping outputs are
averaged with weights that fall off towards the window edges, so peak memory depends on the window, not on
the volume:

- `TileGrid`: windows of a fixed size covering a 3D shape, neighbours sharing at least `overlap` voxels, and
  the blending weights. A window edge that lies on the volume's edge gets no ramp (weight 1 there), an edge
  shared with a neighbour ramps as sin^2 over exactly the shared voxels, so two neighbours' ramps sum to one
  (above a small floor that keeps every weight positive). Weights are separable, and so is their sum over the
  windows: each axis's weights are divided by that axis's sum once, and blending is a plain accumulation (no
  volume-sized weight buffer).
- `WindowedDenoiser`: `denoise(x_t, t)` for the samplers that, at every step, runs the UNet window by window
  (label map cropped per window, conditional and unconditional passes batched) and blends the predictions, so
  the whole latent is denoised jointly rather than stitched afterwards.
- `decode_tiled` / `encode_tiled`: the stage-1 decoder (encoder) over overlapping latent tiles, blended in image
  (latent) space the same way; the output can be gathered on another device (the CPU) than the network's.

A window at least as large as the volume is the plain network call: the result is bitwise the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ddpm.samplers import Denoiser
from utils.errors import UserError

RAMP_FLOOR = 0.01  # the smallest blending weight: every voxel of every window counts a little

Triple = tuple[int, int, int]


def axis_starts(length: int, window: int, overlap: int) -> list[int]:
    """Starts of windows of `window` voxels covering [0, length), neighbours sharing at least `overlap` voxels,
    spread evenly (the first at 0, the last ending at `length`)."""
    if window >= length:
        return [0]
    stride = max(1, window - overlap)
    n = math.ceil((length - window) / stride) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def ramp(width: int) -> torch.Tensor:
    """Rising weights over `width` shared voxels: sin^2 at (j + 1) / (width + 1) * pi / 2, so the ramp of a
    window and the mirrored ramp of its neighbour over the same voxels sum to exactly one."""
    j = torch.arange(width, dtype=torch.float64)
    return torch.sin((j + 1) / (width + 1) * math.pi / 2) ** 2


def axis_weights(length: int, size: int, starts: Sequence[int]) -> list[torch.Tensor]:
    """Per window, its blending weights along one axis divided by the sum over all windows (float64)."""
    raw = []
    for i, start in enumerate(starts):
        w = torch.ones(size, dtype=torch.float64)
        if i > 0:
            shared = starts[i - 1] + size - start
            w[:shared] *= ramp(shared)
        if i + 1 < len(starts):
            shared = start + size - starts[i + 1]
            w[size - shared:] *= ramp(shared).flip(0)
        raw.append(RAMP_FLOOR + (1 - RAMP_FLOOR) * w if len(starts) > 1 else w)
    total = torch.zeros(length, dtype=torch.float64)
    for start, w in zip(starts, raw):
        total[start:start + size] += w
    return [w / total[start:start + size] for start, w in zip(starts, raw)]


@dataclass(frozen=True)
class TileGrid:
    """Windows of `size` (per axis, at most `shape`) at every combination of the per-axis `starts`."""

    shape: Triple
    size: Triple
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @classmethod
    def covering(cls, shape: Sequence[int], window: Sequence[int], overlap: float,
                 multiple: int = 1) -> "TileGrid":
        """Windows of `window` voxels (clamped to the shape) over `shape`; neighbours share at least
        `overlap` (a fraction of the window, in [0, 1)) of it. Window sides must be multiples of `multiple`
        unless they cover their whole axis."""
        shape = tuple(int(s) for s in shape)
        window = tuple(int(w) for w in window)
        if len(shape) != 3 or len(window) != 3:
            raise ValueError(f"window and shape need 3 sides, got {list(window)} and {list(shape)}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"window overlap must be a fraction in [0, 1), got {overlap}")
        if any(w < 1 for w in window):
            raise ValueError(f"window sides must be positive, got {list(window)}")
        size = tuple(min(w, s) for w, s in zip(window, shape))
        if any(w % multiple for w in size):
            raise ValueError(f"window {list(size)} (clamped to the latent {list(shape)}) must be a multiple of "
                             f"{multiple} on every axis")
        starts = tuple(tuple(axis_starts(s, w, math.ceil(overlap * w))) for s, w in zip(shape, size))
        return cls(shape=shape, size=size, starts=starts)

    def __len__(self) -> int:
        return math.prod(len(s) for s in self.starts)

    @property
    def is_single(self) -> bool:
        return len(self) == 1

    def scaled(self, factor: Sequence[int]) -> "TileGrid":
        """The same windows on a grid `factor` times finer per axis (latent windows -> image windows)."""
        f = tuple(int(x) for x in factor)
        return TileGrid(shape=tuple(s * k for s, k in zip(self.shape, f)),
                        size=tuple(s * k for s, k in zip(self.size, f)),
                        starts=tuple(tuple(s * k for s in axis) for axis, k in zip(self.starts, f)))

    def corners(self) -> Iterator[Triple]:
        for x in self.starts[0]:
            for y in self.starts[1]:
                for z in self.starts[2]:
                    yield x, y, z

    def slices(self, corner: Sequence[int]) -> tuple[slice, slice, slice]:
        return tuple(slice(c, c + s) for c, s in zip(corner, self.size))

    def weight_tables(self, device=None, dtype=torch.float32) -> list[dict[int, torch.Tensor]]:
        """Per axis, start -> normalised 1D weights of the window starting there."""
        return [{start: w.to(device=device, dtype=dtype)
                 for start, w in zip(starts, axis_weights(length, size, starts))}
                for length, size, starts in zip(self.shape, self.size, self.starts)]

    def border_positions(self) -> list[list[int]]:
        """Per axis, the voxel indices where a window starts or ends inside the volume (the would-be seams)."""
        return [sorted({p for s in starts for p in (s, s + size)} - {0, length})
                for length, size, starts in zip(self.shape, self.size, self.starts)]


def window_weight(tables: list[dict[int, torch.Tensor]], corner: Sequence[int]) -> torch.Tensor:
    wx, wy, wz = (table[c] for table, c in zip(tables, corner))
    return (wx[:, None, None] * wy[None, :, None] * wz[None, None, :])[None, None]


def blend(fn: Callable[[Triple], torch.Tensor], grid_in: TileGrid, grid_out: TileGrid, out: torch.Tensor
          ) -> torch.Tensor:
    """out[..., window] += weight * fn(corner) for every window; `fn` gets the corner on `grid_in` and returns
    the window's output on `grid_out` (same window, possibly another resolution). `out` must start at zero."""
    tables = grid_out.weight_tables(device=out.device, dtype=out.dtype)
    for corner_in, corner_out in zip(grid_in.corners(), grid_out.corners()):
        piece = fn(corner_in).to(device=out.device, dtype=out.dtype)
        out[(..., *grid_out.slices(corner_out))] += piece * window_weight(tables, corner_out)
    return out


def parse_window(value) -> tuple[int, int, int] | None:
    """`window=` of the CLIs: null (the checkpoint's default), one positive integer for every axis, or three
    (latent voxels X, Y, Z)."""
    if value is None:
        return None
    values = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise UserError(f"window={value}: expected null, a positive integer or 3 positive integers (latent voxels)")
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


# the stage-1 networks -------------------------------------------------------------------------------------------
def blend_into_new(one: Callable[[Triple], torch.Tensor], grid_in: TileGrid, grid_out: TileGrid, *,
                   out_device: torch.device | str | None = None) -> torch.Tensor:
    """`blend` into a fresh float32 buffer whose batch and channels are those of the first window's output,
    on `out_device` (default: where the outputs are computed). A single window is returned as it is."""
    first_corner = next(grid_in.corners())
    first = one(first_corner).float()
    if grid_in.is_single:
        return first.to(out_device or first.device)
    out = torch.zeros((*first.shape[:2], *grid_out.shape), dtype=torch.float32, device=out_device or first.device)
    pending = {first_corner: first}
    return blend(lambda c: pending.pop(c) if c in pending else one(c), grid_in, grid_out, out)


def decode_tiled(decode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], latent: torch.Tensor,
                 label: torch.Tensor | None, *, factor: Sequence[int], tile: Sequence[int], overlap: float,
                 out_device: torch.device | str | None = None) -> torch.Tensor:
    """`decode(latent_tile, label_tile) -> image_tile` over overlapping latent tiles of `tile` voxels, blended
    in image space; the label (image grid, or None) may live on the CPU: it is cropped per tile and moved to
    the latent's device. The image (float32) is gathered on `out_device` (default: the latent's device)."""
    grid = TileGrid.covering(latent.shape[2:], tile, overlap)
    image_grid = grid.scaled(factor)
    image_corners = dict(zip(grid.corners(), image_grid.corners()))

    def one(corner: Triple) -> torch.Tensor:
        crop = None
        if label is not None:
            crop = label[(..., *image_grid.slices(image_corners[corner]))].to(latent.device)
        return decode(latent[(..., *grid.slices(corner))], crop)

    return blend_into_new(one, grid, image_grid, out_device=out_device)


def encode_tiled(encode: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, *, factor: Sequence[int],
                 tile: Sequence[int], overlap: float, device: torch.device | str | None = None,
                 out_device: torch.device | str | None = None) -> torch.Tensor:
    """`encode(image_tile) -> latent_tile` over overlapping tiles of `tile` latent voxels (`tile * factor` image
    voxels), blended in latent space. `image` may live on the CPU: each tile is moved to `device` (default:
    the image's), the latent is gathered on `out_device` (default: `device`)."""
    if any(s % f for s, f in zip(image.shape[2:], factor)):
        raise ValueError(f"image {list(image.shape[2:])} is not divisible by the stage-1 factor {list(factor)}")
    grid = TileGrid.covering([s // f for s, f in zip(image.shape[2:], factor)], tile, overlap)
    image_grid = grid.scaled(factor)
    image_corners = dict(zip(grid.corners(), image_grid.corners()))

    def one(corner: Triple) -> torch.Tensor:
        return encode(image[(..., *image_grid.slices(image_corners[corner]))].to(device or image.device))

    return blend_into_new(one, grid, grid, out_device=out_device)
