"""Figures of the evaluation tools (PNG, written atomically, headless matplotlib)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.atomic import atomic_path  # noqa: E402


def _save(fig, path: Path, overwrite: bool) -> Path:
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def class_histograms(real: dict[int, np.ndarray], fake: dict[int, np.ndarray], *, bins: int, unit: str,
                     path: Path, overwrite: bool, class_names: list[str] | None = None,
                     title: str = "Intensity per label class: real vs synthetic") -> Path:
    """One panel per label class: density of real vs synthetic values (voxel intensities, or per-map class
    volumes) on shared bins."""
    classes = sorted(set(real) | set(fake))
    cols = min(len(classes), 4) or 1
    rows = max(1, -(-len(classes) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax, cls in zip(axes.flat, classes):
        values = [v for v in (real.get(cls), fake.get(cls)) if v is not None and v.size]
        if not values:
            ax.axis("off")
            continue
        low = min(float(v.min()) for v in values)
        high = max(float(v.max()) for v in values)
        edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
        for data, name, color in ((real.get(cls), "real", "tab:blue"), (fake.get(cls), "synthetic", "tab:orange")):
            if data is not None and data.size:
                ax.hist(data, bins=edges, density=True, histtype="step", color=color, label=name)
        name = f" {class_names[cls]}" if class_names is not None and cls < len(class_names) else ""
        ax.set_title(f"class {cls}{name}", fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, overwrite)


def slice_panel(rows: list[dict], *, path: Path, overwrite: bool) -> Path:
    """Rows of middle axial slices: real, synthetic and (if given) the label map of each case."""
    with_label = any(row.get("label") is not None for row in rows)
    cols = 3 if with_label else 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.6 * len(rows)), squeeze=False,
                             constrained_layout=True)
    for r, row in enumerate(rows):
        low, high = np.percentile(row["real"], [0.5, 99.5])
        panels = [(row["real"], f"real {row['real_name']}"), (row["fake"], f"synthetic {row['fake_name']}")]
        for c, (image, title) in enumerate(panels):
            axes[r, c].imshow(np.rot90(image), cmap="gray", vmin=low, vmax=high)
            axes[r, c].set_title(title, fontsize=7)
        if with_label:
            label = row.get("label")
            if label is not None:
                axes[r, 2].imshow(np.rot90(label), cmap="tab10", interpolation="nearest",
                                  vmin=0, vmax=max(9, int(label.max())))
            axes[r, 2].set_title("label map", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    return _save(fig, path, overwrite)


def nearest_neighbour_histogram(values: np.ndarray, reference: np.ndarray | None, *, threshold: float,
                                xlabel: str, path: Path, overwrite: bool) -> Path:
    """Distribution of each synthetic volume's best match in the training set (and, for scale, of each training
    volume's best match among the other training volumes), with the near-copy threshold."""
    fig, ax = plt.subplots(figsize=(5, 3))
    data = [values] + ([reference] if reference is not None and reference.size else [])
    low = min(float(np.min(d)) for d in data + [np.array([threshold])])
    edges = np.linspace(low, 1.0, 41)
    ax.hist(values, bins=edges, alpha=0.7, label="synthetic -> nearest training")
    if reference is not None and reference.size:
        ax.hist(reference, bins=edges, alpha=0.5, label="training -> nearest other training")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("volumes")
    ax.legend(fontsize=7)
    return _save(fig, path, overwrite)


def adjacency_matrices(matrices: dict[str, np.ndarray], class_names: list[str], *, path: Path,
                       overwrite: bool) -> Path:
    """Class adjacency matrices side by side (shares of different-class face pairs), and the difference of the
    second to the first."""
    (first, a), (second, b) = list(matrices.items())[:2]
    panels = [(first, a, "viridis"), (second, b, "viridis"), (f"{second} - {first}", b - a, "coolwarm")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"wspace": 0.5})
    top = max(float(a.max()), float(b.max()), 1e-12)
    spread = max(float(np.abs(b - a).max()), 1e-12)
    for ax, (name, matrix, cmap) in zip(axes, panels):
        limits = (-spread, spread) if cmap == "coolwarm" else (0.0, top)
        image = ax.imshow(matrix, cmap=cmap, vmin=limits[0], vmax=limits[1])
        ax.set_xticks(range(len(class_names)), class_names, rotation=60, fontsize=7, ha="right")
        ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("Class adjacency: share of different-class face-neighbour pairs", fontsize=10)
    return _save(fig, path, overwrite)
