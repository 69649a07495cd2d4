"""The embedded demo data set, built offline from the MNI152 templates that nilearn ships.

Labels: 0 background, 1 CSF/other (inside the brain envelope where neither grey nor white matter dominates; no CSF
map ships offline), 2 grey matter, 3 white matter, 4 lesion (random irregular blobs seeded in white matter,
brighter than every tissue). Each subject is the template under a random smooth deformation and small affine,
with its own tissue contrast, a multiplicative bias field and Rician noise, in arbitrary MR units (int16), on
the configured spacing. Deterministic by `demo.seed`.

Built on first use into `<cache_dir>/demo/` (`images/` + `labels/`, `subject000.nii.gz`, ...) in a temporary
folder that is renamed into place; rebuilt only when its settings change.

    python -m dataset.demo --preview assets/demo_preview.png [dataset overrides]
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import ndimage

from dataset.geometry import to_model_grid
from dataset.io import load_nifti, save_nifti
from dataset.layout import as_config
from utils.atomic import atomic_path
from utils.errors import UserError, exit_on_user_error
from utils.paths import CONFIG_DIR, cache_dir

DEMO_VERSION = 1
CLASS_NAMES = ("background", "csf_other", "grey_matter", "white_matter", "lesion")
LESION_CONTRAST = 1.3  # lesion intensity relative to the subject's median white-matter intensity
MAX_DISPLACEMENT_MM = 4.0


def demo_root(cfg: Mapping) -> Path:
    return cache_dir(as_config(cfg).get("cache_dir")) / "demo"


def demo_settings(cfg: Mapping) -> dict:
    cfg = as_config(cfg)
    return {"version": DEMO_VERSION, "n_subjects": int(cfg.demo.n_subjects), "seed": int(cfg.demo.seed),
            "spacing": [float(s) for s in cfg.spacing]}


def subject_ids(n_subjects: int) -> list[str]:
    return [f"subject{i:03d}" for i in range(n_subjects)]


def load_templates(spacing) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """T1, grey- and white-matter maps (float32 in [0, 1]) resampled to `spacing`, and their affine."""
    return _load_templates(tuple(float(s) for s in spacing))


@functools.lru_cache(maxsize=2)
def _load_templates(spacing: tuple[float, float, float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    maps, affine = {}, None
    for name, loader in (("t1", load_mni152_template), ("gm", load_mni152_gm_template),
                         ("wm", load_mni152_wm_template)):
        image = loader(resolution=1)
        array, grid = to_model_grid(np.asarray(image.get_fdata(), dtype=np.float32), image.affine, spacing,
                                    is_label=False)
        maps[name], affine = np.clip(array, 0.0, 1.0), grid.model_affine
        maps[name].flags.writeable = False  # shared by the cache above
    return maps, affine


def _smooth_noise(rng: np.random.Generator, shape, max_cycles: float = 1.0, n_waves: int = 8) -> np.ndarray:
    """Smooth random field in [-1, 1]: a sum of random plane waves of at most `max_cycles` per field of view
    (each wave a separable product of complex exponentials, so the sum is one einsum)."""
    frequency = rng.uniform(-max_cycles, max_cycles, size=(n_waves, 3)) * 2 * np.pi
    weight = rng.normal(size=n_waves) * np.exp(1j * rng.uniform(0, 2 * np.pi, size=n_waves))
    waves = [np.exp(1j * frequency[:, axis, None] * np.linspace(0.0, 1.0, n)[None]).astype(np.complex64)
             for axis, n in enumerate(shape)]
    field = np.einsum("w,wi,wj,wk->ijk", weight.astype(np.complex64), *waves, optimize=True).real
    return (field / max(1e-6, float(np.abs(field).max()))).astype(np.float32)


def _sampling_coordinates(rng: np.random.Generator, shape, spacing) -> np.ndarray:
    """Voxel coordinates to sample the template at: a small random affine plus a smooth displacement."""
    centre = (np.asarray(shape) - 1) / 2
    angle = np.deg2rad(rng.uniform(-6, 6))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = rotation @ np.diag(rng.uniform(0.93, 1.07, size=3))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    offsets = grid - centre[:, None, None, None]
    coords = np.einsum("ij,j...->i...", matrix, offsets) + centre[:, None, None, None]
    for axis in range(3):
        coords[axis] += _smooth_noise(rng, shape) * MAX_DISPLACEMENT_MM / float(spacing[axis])
    return coords


def _lesions(rng: np.random.Generator, white_matter: np.ndarray, envelope: np.ndarray, spacing) -> np.ndarray:
    """1-3 irregular blobs of 6-12 mm radius, centred on white-matter voxels, kept inside the brain."""
    lesion = np.zeros(white_matter.shape, dtype=bool)
    candidates = np.argwhere(ndimage.binary_erosion(white_matter, iterations=1))
    if len(candidates) == 0:
        candidates = np.argwhere(white_matter)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in white_matter.shape], indexing="ij")).astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(6.0, 12.0, size=3) / np.asarray(spacing, dtype=np.float32)
        distance = np.sqrt(sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))
        wobble = 0.25 * _smooth_noise(rng, white_matter.shape, max_cycles=4.0)
        lesion |= (distance + wobble) < 1.0
    return lesion & envelope


def make_subject(templates: Mapping[str, np.ndarray], spacing, rng: np.random.Generator):
    """(image int16, label uint8) of one synthetic subject."""
    shape = templates["t1"].shape
    coords = _sampling_coordinates(rng, shape, spacing)
    warped = {k: ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0)
              for k, v in templates.items()}
    envelope = ndimage.binary_fill_holes((warped["t1"] > 0.2) | (warped["gm"] + warped["wm"] > 0.2))
    csf = np.clip(1.0 - warped["gm"] - warped["wm"], 0.0, 1.0)
    label = (np.argmax(np.stack([csf, warped["gm"], warped["wm"]]), axis=0) + 1).astype(np.uint8)
    label[~envelope] = 0
    lesion = _lesions(rng, label == 3, envelope, spacing)
    label[lesion] = 4

    # tissue contrast jitter, then lesions brighter than every tissue, blended at their edge
    t1 = warped["t1"] * (1.0 + rng.uniform(-0.06, 0.06) * warped["gm"] + rng.uniform(-0.06, 0.06) * warped["wm"])
    lesion_value = LESION_CONTRAST * float(np.median(t1[label == 3]))
    weight = ndimage.gaussian_filter(lesion.astype(np.float32), sigma=0.6) * envelope
    weight[lesion] = 1.0
    t1 = t1 * (1.0 - weight) + lesion_value * weight

    bias = np.exp(0.15 * _smooth_noise(rng, shape, max_cycles=0.6))
    gain = rng.uniform(600.0, 1000.0)
    clean = t1 * bias * gain
    sigma = 0.02 * gain
    noisy = np.sqrt((clean + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    return np.round(noisy).astype(np.int16), label


def build_demo_dataset(root: Path, cfg: Mapping) -> None:
    """Write the demo data set into the (new or empty) folder `root`."""
    settings = demo_settings(cfg)
    if settings["n_subjects"] < 1:
        raise UserError(f"dataset.demo.n_subjects: need at least 1 subject, got {settings['n_subjects']}")
    templates, affine = load_templates(settings["spacing"])
    for index, case_id in enumerate(subject_ids(settings["n_subjects"])):
        rng = np.random.default_rng([settings["seed"], index])
        image, label = make_subject(templates, settings["spacing"], rng)
        save_nifti(image, affine, root / "images" / f"{case_id}.nii.gz")
        save_nifti(label, affine, root / "labels" / f"{case_id}.nii.gz")
    (root / "demo.json").write_text(json.dumps(settings, indent=1) + "\n")


def _current(root: Path, settings: dict) -> bool:
    try:
        return json.loads((root / "demo.json").read_text()) == settings
    except (OSError, json.JSONDecodeError):
        return False


def ensure_demo_dataset(cfg: Mapping) -> Path:
    """The demo data folder, built now if missing or built with other settings."""
    root = demo_root(cfg)
    settings = demo_settings(cfg)
    if _current(root, settings):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root.parent))
    old = None
    try:
        build_demo_dataset(tmp, cfg)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if _current(root, settings):  # another process finished first
            return root
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=".demo-old-", dir=root.parent))
            root.rename(old / "demo")
        try:
            tmp.rename(root)
        except OSError:  # another process renamed its build into place in between
            if not _current(root, settings):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return root


def write_preview(root: Path, path: Path, n_subjects: int = 4, overwrite: bool = True) -> Path:
    """PNG of `n_subjects` subjects: axial and coronal slices through a lesion, without and with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    images = sorted((root / "images").glob("*.nii.gz"))[:n_subjects]
    if not images:
        raise UserError(f"{root}: no demo images to preview")
    colours = ListedColormap(["#00000000", "#1f77b4", "#2ca02c", "#ffdd57", "#d62728"])
    figure, axes = plt.subplots(len(images), 4, figsize=(9.0, 2.4 * len(images)), squeeze=False)
    for row, image_path in enumerate(images):
        image, affine = load_nifti(image_path)
        label, _ = load_nifti(root / "labels" / image_path.name)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        components, n_components = ndimage.label(label == 4)
        if n_components:  # slices through the largest lesion
            largest = 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
            centre = np.argwhere(components == largest).mean(axis=0).round().astype(int)
        else:
            centre = np.asarray(label.shape) // 2
        views = (("axial", image[:, :, centre[2]], label[:, :, centre[2]], spacing[1] / spacing[0]),
                 ("coronal", image[:, centre[1], :], label[:, centre[1], :], spacing[2] / spacing[0]))
        for view, (title, image_slice, label_slice, aspect) in enumerate(views):
            for overlay in (False, True):
                axis = axes[row, 2 * view + overlay]
                axis.imshow(image_slice.T, cmap="gray", origin="lower", aspect=aspect)
                if overlay:
                    axis.imshow(np.ma.masked_equal(label_slice.T, 0), cmap=colours, vmin=0, vmax=4, alpha=0.5,
                                origin="lower", aspect=aspect, interpolation="nearest")
                axis.set_axis_off()
                axis.set_title(f"{image_path.name.split('.')[0]} {title}{' + labels' if overlay else ''}",
                               fontsize=8)
    figure.suptitle("demo data: CSF/other (blue), grey matter (green), white matter (yellow), lesion (red)",
                    fontsize=9)
    figure.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, dpi=75, format="png")
    plt.close(figure)
    return path


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir

    parser = argparse.ArgumentParser(description="Build the embedded demo data set and optionally preview it.")
    parser.add_argument("--preview", type=Path, help="write a PNG preview here (e.g. assets/demo_preview.png)")
    parser.add_argument("--subjects", type=int, default=4, help="number of subjects in the preview")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset.demo.n_subjects=8")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="check", overrides=["dataset=demo", *args.overrides])
    root = ensure_demo_dataset(cfg.dataset)
    print(f"demo data set: {root}")
    if args.preview is not None:
        print(f"preview: {write_preview(root, args.preview, n_subjects=args.subjects)}")


if __name__ == "__main__":
    main()
