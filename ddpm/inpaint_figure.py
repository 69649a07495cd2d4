"""Pictures of an inpainting: axial and coronal slices through the regenerated zone, side by side.

Volumes are shown in RAS orientation (the input's axes permuted/flipped, never resampled), anterior and superior
up, with the zone outlined, so a counterfactual can be compared with its original at a glance.
"""
from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nibabel import orientations  # noqa: E402

from dataset.geometry import RAS, voxel_spacing  # noqa: E402
from ddpm.previews import LABEL_COLORMAP  # noqa: E402
from utils.atomic import atomic_path  # noqa: E402

# a panel: (title, volume on the input grid, kind) with kind "image", "label" or "difference"
Panel = tuple[str, np.ndarray, str]


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return orientations.apply_orientation(volume, orientations.ornt_transform(orientations.io_orientation(affine),
                                                                              RAS))


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    order = np.argsort(orientations.io_orientation(affine)[:, 0])
    return voxel_spacing(affine)[order]


def zone_centre(zone_ras: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(c)) for c in np.argwhere(zone_ras).mean(axis=0))


def save_panels(path: str | os.PathLike, panels: Sequence[Panel], zone: np.ndarray, affine: np.ndarray, *,
                label_nc: int, title: str, overwrite: bool) -> None:
    """One column per panel; rows: the axial and the coronal slice through the zone's centre."""
    zone_ras = to_ras(zone.astype(np.uint8), affine)
    x, y, z = zone_centre(zone_ras)
    sx, sy, sz = ras_spacing(affine)
    volumes = [(name, to_ras(volume, affine), kind) for name, volume, kind in panels]
    grey = [v for _, v, kind in volumes if kind == "image"]
    low, high = np.percentile(np.concatenate([g.ravel() for g in grey]), [1, 99]) if grey else (0.0, 1.0)
    colours = plt.get_cmap(LABEL_COLORMAP)(np.arange(max(label_nc, 1)) % 20)
    colours[0] = (0, 0, 0, 1)
    views = [("axial", lambda v: v[:, :, z], sy / sx), ("coronal", lambda v: v[:, y, :], sz / sx)]
    fig, axes = plt.subplots(len(views), len(volumes), figsize=(2.6 * len(volumes), 4.6), squeeze=False)
    for col, (name, volume, kind) in enumerate(volumes):
        for row, (view, cut, aspect) in enumerate(views):
            ax = axes[row, col]
            plane = cut(volume).T
            if kind == "label":
                ax.imshow(colours[np.clip(plane.astype(int), 0, len(colours) - 1)], origin="lower", aspect=aspect,
                          interpolation="nearest")
            elif kind == "difference":
                span = float(np.abs(plane).max()) or 1.0
                ax.imshow(plane, cmap="coolwarm", vmin=-span, vmax=span, origin="lower", aspect=aspect,
                          interpolation="nearest")
            else:
                ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect,
                          interpolation="nearest")
            outline = cut(zone_ras).T
            if outline.any() and not outline.all():
                ax.contour(outline, levels=[0.5], colors="yellow", linewidths=0.6, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(view, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def save_inpaint_png(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, result: np.ndarray,
                     zone: np.ndarray, affine: np.ndarray, *, label_nc: int, title: str, overwrite: bool) -> None:
    """The CLI's preview: input, edited label map, inpainted result and their difference."""
    difference = result.astype(np.float32) - image.astype(np.float32)
    save_panels(path, [("input", image, "image"), ("edited label map", labels, "label"),
                       ("inpainted", result, "image"), ("inpainted - input", difference, "difference")],
                zone, affine, label_nc=label_nc, title=title, overwrite=overwrite)
