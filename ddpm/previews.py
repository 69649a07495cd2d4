"""Pictures of a synthesis: the three orthogonal middle slices with the label map over them (PNG), an animated
GIF through the slices of label, synthetic (and real) volumes, and the denoising progression.

Arrays are on the model grid (RAS, the training spacing), so every picture is oriented the same way whatever the
input's orientation: X left-right, Y posterior-anterior, Z inferior-superior, shown with anterior/superior up.
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.atomic import atomic_path  # noqa: E402

LABEL_COLORMAP = "tab20"


def _window(volume: np.ndarray) -> tuple[float, float]:
    """Display window: 1st-99th percentile of the whole volume (same for every slice)."""
    low, high = np.percentile(volume, [1, 99])
    return float(low), float(high if high > low else low + 1)


def _slices(volume: np.ndarray) -> list[np.ndarray]:
    x, y, z = (s // 2 for s in volume.shape)
    return [volume[x, :, :], volume[:, y, :], volume[:, :, z]]  # sagittal, coronal, axial


def _aspects(spacing: Sequence[float]) -> list[float]:
    sx, sy, sz = spacing
    return [sz / sy, sz / sx, sy / sx]  # height / width per displayed pixel, after the transpose below


def _label_rgba(label: np.ndarray, label_nc: int, alpha: float) -> np.ndarray:
    colours = plt.get_cmap(LABEL_COLORMAP)(np.arange(max(label_nc, 1)) % 20)
    rgba = colours[label]
    rgba[..., 3] = np.where(label > 0, alpha, 0.0)
    return rgba


def save_overlay_png(path: str | os.PathLike, image: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                     label_nc: int, *, title: str, overwrite: bool) -> None:
    """Three orthogonal middle slices of `image` with the label map drawn over them."""
    low, high = _window(image)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, img, lab, aspect, name in zip(axes, _slices(image), _slices(label), _aspects(spacing),
                                          ("sagittal", "coronal", "axial")):
        ax.imshow(img.T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect,
                  interpolation="nearest")
        ax.imshow(_label_rgba(lab.T, label_nc, 0.35), origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _to_uint8(slice_: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return (np.clip((slice_ - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)


def save_slices_gif(path: str | os.PathLike, panels: Sequence[tuple[str, np.ndarray]], label_nc: int, *,
                    overwrite: bool, frame_ms: int = 80) -> None:
    """Animated GIF through the axial slices (Z) of the volumes side by side. A panel named "label" is drawn in
    the label colours, the others in grey with their own display window."""
    import imageio.v3 as iio

    n_slices = min(volume.shape[2] for _, volume in panels)
    windows = [None if name == "label" else _window(volume) for name, volume in panels]
    colours = (plt.get_cmap(LABEL_COLORMAP)(np.arange(max(label_nc, 1)) % 20)[:, :3] * 255).astype(np.uint8)
    colours[0] = 0
    frames = []
    for z in range(n_slices):
        tiles = []
        for (name, volume), window in zip(panels, windows):
            tile = np.rot90(volume[:, :, z])
            if window is None:
                rgb = colours[np.clip(tile, 0, len(colours) - 1)]
            else:
                rgb = np.repeat(_to_uint8(tile, window)[..., None], 3, axis=2)
            tiles += [rgb, np.full((rgb.shape[0], 2, 3), 255, dtype=np.uint8)]
        frames.append(np.concatenate(tiles[:-1], axis=1))
    with atomic_path(path, overwrite=overwrite) as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=frame_ms, loop=0)


def save_progress_png(path: str | os.PathLike, snapshots: Sequence[tuple[int, np.ndarray, np.ndarray]], *,
                      overwrite: bool) -> None:
    """Denoising progression: for each recorded step (timestep t), the decoded current sample x_t (top) and
    the decoded prediction of the clean volume (bottom), middle axial slice."""
    n = len(snapshots)
    window = _window(snapshots[-1][2])
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for col, (t, noisy, predicted) in enumerate(snapshots):
        for row, volume in enumerate((noisy, predicted)):
            ax = axes[row, col]
            ax.imshow(np.rot90(volume[:, :, volume.shape[2] // 2]), cmap="gray", vmin=window[0], vmax=window[1])
            ax.axis("off")
        axes[0, col].set_title(f"t={t}", fontsize=8)
    axes[0, 0].text(-0.1, 0.5, "x_t", transform=axes[0, 0].transAxes, ha="right", va="center", fontsize=8)
    axes[1, 0].text(-0.1, 0.5, "x0 pred.", transform=axes[1, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
