"""Overlapping tiles of a 3D volume and their blending: the one scheme used wherever a network trained on crops
runs over a larger volume (stage-1 reconstruction, tiled stage-1 encode/decode, windowed stage-2 denoising).

- `TileGrid`: windows of a fixed size covering a 3D shape, neighbours sharing at least `overlap` voxels, and
  the blending weights. A window edge that lies on the volume's edge gets no ramp (weight 1 there), an edge
  shared with a neighbour ramps as sin^2 over exactly the shared voxels, so two neighbours' ramps sum to one
  (above a small floor that keeps every weight positive). Weights are separable, and so is their sum over the
  windows: each axis's weights are divided by that axis's sum once, and blending is a plain accumulation (no
  volume-sized weight buffer).
- `blend` / `blend_into_new`: accumulate weighted window outputs (possibly on a finer grid than the windows'
  inputs, e.g. latent tiles decoded to image tiles). `tiled_apply`: a same-grid network (image -> image) over
  windows; `decode_tiled` / `encode_tiled`: the stage-1 decoder (encoder) over overlapping latent tiles,
  blended in image (latent) space. Outputs can be gathered on another device (the CPU) than the network's.

A window at least as large as the volume is the plain network call: the result is bitwise the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

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


def tiled_apply(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None, window: Sequence[int], overlap: float,
                device: torch.device | str | None = None,
                out_device: torch.device | str | None = None, tiles_per_call: int = 1) -> torch.Tensor:
    """`fn(*input_tiles) -> output_tile` (same spatial size as the tiles) over overlapping windows of `window`
    voxels of the inputs' common (X, Y, Z) shape, blended; a None input is passed as None. The inputs may live on
    the CPU: each tile is moved to `device` (default: the first input's), the output (float32) is gathered on
    `out_device` (default: `device`). `tiles_per_call` > 1 stacks that many consecutive tiles along the batch axis
    of one call (small networks on small tiles are call-bound; `fn` must treat samples independently)."""
    grid = TileGrid.covering(inputs[0].shape[2:], window, overlap)
    device = device or inputs[0].device
    corners = list(grid.corners())
    pending: dict[Triple, torch.Tensor] = {}

    def tiles(corner: Triple, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[(..., *grid.slices(corner))].to(device)

    def one(corner: Triple) -> torch.Tensor:
        if corner not in pending:  # the next `tiles_per_call` corners in the order blending asks for them
            chunk = corners[corners.index(corner):][:max(1, int(tiles_per_call))]
            batch = [None if x is None else torch.cat([tiles(c, x) for c in chunk]) for x in inputs]
            pending.update(zip(chunk, fn(*batch).split(inputs[0].shape[0])))
        return pending.pop(corner)

    return blend_into_new(one, grid, grid, out_device=out_device or device)


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
