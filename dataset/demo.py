"""The embedded demo data set, built offline from the MNI152 templates that nilearn ships.

Labels: 0 background, 1 CSF/other (inside the brain envelope where neither grey nor white matter dominates; no CSF
map ships offline), 2 grey matter, 3 white matter, 4 lesion. Each subject is the template under its own global
shape (per-axis scale, rotation about every axis, a left-right asymmetry: each hemisphere scaled on its own in
width and length) and a smooth random deformation (`dataset.demo_warp`), with its own tissue contrast, a
multiplicative bias field and Rician noise, in arbitrary MR units (int16), on the configured spacing.

Lesions (`dataset.demo.lesions`): a random number per subject, each with a random host tissue (white or grey
matter; the lesion is clipped to its host, so it lies inside it), an equivalent radius, a shape (a randomly
oriented ellipsoid or a lumpy blob) and an appearance (homogeneous and brighter than every tissue, or a ring:
a bright rim around a core darker than white matter). Lesions never touch each other. Their parameters are
written to `lesions.json`. Deterministic by `demo.seed`.

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from dataset.demo_warp import sampling_coordinates, smooth_noise
from dataset.geometry import to_model_grid
from dataset.io import load_nifti, save_nifti, strip_nifti_suffix
from utils.atomic import atomic_path
from utils.errors import UserError, exit_on_user_error
from utils.paths import CONFIG_DIR, cache_dir

DEMO_VERSION = 2
CLASS_NAMES = ("background", "csf_other", "grey_matter", "white_matter", "lesion")
LESION = 4
HOSTS = {"grey_matter": 2, "white_matter": 3}
SHAPES = ("ellipsoid", "lumpy")
APPEARANCES = ("homogeneous", "ring")
RING_MIN_RADIUS_MM = 6.0        # a ring needs room for a rim and a core
RING_CORE = 0.55                # core: inside this fraction of the lesion's radius
LESION_BRIGHTNESS = (1.2, 1.45)  # homogeneous lesions and ring rims, relative to the median white matter
CORE_DARKNESS = (0.45, 0.7)     # ring cores, relative to the median white matter


@dataclass(frozen=True)
class Lesion:
    """One drawn lesion: `radius_mm` is the equivalent-sphere radius of its shape before it is clipped to its
    host tissue."""

    host: str
    radius_mm: float
    shape: str
    appearance: str


@dataclass
class Subject:
    image: np.ndarray        # int16, arbitrary MR units
    label: np.ndarray        # uint8, CLASS_NAMES
    tissue: np.ndarray       # uint8, the label map before the lesions were painted in
    lesions: list[Lesion]
    masks: list[np.ndarray]  # one boolean mask per lesion
    centres: list[tuple[int, int, int]]


def demo_root(cfg: Mapping) -> Path:
    return cache_dir(cfg.get("cache_dir")) / "demo"


def _choices(value, key: str, allowed: Sequence[str]) -> list[str]:
    chosen = [str(v) for v in value]
    if not chosen or any(v not in allowed for v in chosen):
        raise UserError(f"dataset.demo.lesions.{key}: need a non-empty list of {', '.join(allowed)}, got {chosen}")
    return chosen


def _range(value, key: str, kind, minimum) -> list:
    low, high = (kind(v) for v in value) if len(value) == 2 else (None, None)
    if low is None or not minimum <= low <= high:
        raise UserError(f"dataset.demo.lesions.{key}: need [low, high] with {minimum} <= low <= high, got "
                        f"{list(value)}")
    return [low, high]


def lesion_settings(demo_cfg: Mapping) -> dict:
    """The checked `dataset.demo.lesions` settings."""
    lesions = demo_cfg["lesions"]
    return {"count": _range(lesions["count"], "count", int, 0),
            "radius_mm": _range(lesions["radius_mm"], "radius_mm", float, 0.5),
            "hosts": _choices(lesions["hosts"], "hosts", tuple(HOSTS)),
            "shapes": _choices(lesions["shapes"], "shapes", SHAPES),
            "appearances": _choices(lesions["appearances"], "appearances", APPEARANCES)}


def demo_settings(cfg: Mapping) -> dict:
    demo = cfg["demo"]
    return {"version": DEMO_VERSION, "n_subjects": int(demo["n_subjects"]), "seed": int(demo["seed"]),
            "spacing": [float(s) for s in cfg["spacing"]], "lesions": lesion_settings(demo)}


def subject_ids(n_subjects: int) -> list[str]:
    return [f"subject{i:03d}" for i in range(n_subjects)]


def subject_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(anatomy, lesions) generators of subject `index`: the lesion plan does not depend on the anatomy."""
    return np.random.default_rng([seed, index]), np.random.default_rng([seed, index, 1])


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


def plan_lesions(rng: np.random.Generator, settings: Mapping) -> list[Lesion]:
    """The lesions of one subject (the first draws of its lesion generator)."""
    low, high = settings["radius_mm"]
    plan = []
    for _ in range(int(rng.integers(settings["count"][0], settings["count"][1] + 1))):
        host = settings["hosts"][int(rng.integers(len(settings["hosts"])))]
        shape = settings["shapes"][int(rng.integers(len(settings["shapes"])))]
        appearance = settings["appearances"][int(rng.integers(len(settings["appearances"])))]
        smallest = low if appearance == "homogeneous" else min(high, max(low, RING_MIN_RADIUS_MM))
        plan.append(Lesion(host, float(rng.uniform(smallest, high)), shape, appearance))
    return plan


def _lesion_distance(rng: np.random.Generator, lesion: Lesion, offsets_mm: np.ndarray) -> np.ndarray:
    """Normalised distance from the centre (< 1 inside) of a randomly oriented ellipsoid, lumpy if asked."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    orientation = q * np.sign(np.diag(r))
    ratios = np.exp(rng.uniform(-0.4, 0.4, size=3))
    semi_axes = lesion.radius_mm * ratios / np.prod(ratios) ** (1 / 3)
    local = np.einsum("ji,j...->i...", orientation, offsets_mm) / semi_axes[:, None, None, None]
    distance = np.sqrt((local ** 2).sum(axis=0))
    if lesion.shape == "lumpy":
        distance = distance * (1.0 + 0.35 * smooth_noise(rng, distance.shape, max_cycles=1.5))
    return distance


def _place_lesions(rng: np.random.Generator, plan: list[Lesion], tissue: np.ndarray, spacing):
    """(masks, cores, centres): each lesion centred where its host tissue has room (deep inside it and away from
    earlier lesions), clipped to its host and kept one voxel away from every other lesion."""
    spacing = np.asarray(spacing, dtype=np.float32)
    occupied = np.zeros(tissue.shape, dtype=bool)
    masks, cores, centres = [], [], []
    for lesion in plan:
        host = tissue == HOSTS[lesion.host]
        free = host & ~ndimage.binary_dilation(occupied, iterations=1) if occupied.any() else host
        if not free.any():
            raise RuntimeError(f"demo: no {lesion.host} left for a lesion")
        room = ndimage.distance_transform_edt(free, sampling=spacing)
        wanted = min(lesion.radius_mm, float(np.quantile(room[free], 0.9)))
        candidates = np.argwhere(free & (room >= wanted))
        centre = candidates[int(rng.integers(len(candidates)))]
        half = np.ceil(1.4 * lesion.radius_mm / spacing).astype(int)
        low, high = np.maximum(centre - half, 0), np.minimum(centre + half + 1, tissue.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        offsets = np.stack(np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(low, high, centre)],
                                       indexing="ij")).astype(np.float32) * spacing[:, None, None, None]
        distance = _lesion_distance(rng, lesion, offsets)
        distance[tuple(centre - low)] = 0.0  # the centre voxel always belongs to the lesion
        mask = np.zeros(tissue.shape, dtype=bool)
        mask[box] = (distance < 1.0) & free[box]
        core = np.zeros(tissue.shape, dtype=bool)
        if lesion.appearance == "ring":
            core[box] = (distance < RING_CORE) & mask[box]
        occupied |= mask
        masks.append(mask)
        cores.append(core)
        centres.append(tuple(int(c) for c in centre))
    return masks, cores, centres


def make_subject(templates: Mapping[str, np.ndarray], spacing, rngs, lesion_cfg: Mapping) -> Subject:
    """One synthetic subject from its (anatomy, lesions) generators (`subject_rngs`)."""
    anatomy_rng, lesion_rng = rngs
    shape = templates["t1"].shape
    coords = sampling_coordinates(anatomy_rng, shape, spacing)
    warped = {k: ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0)
              for k, v in templates.items()}
    envelope = ndimage.binary_fill_holes((warped["t1"] > 0.2) | (warped["gm"] + warped["wm"] > 0.2))
    csf = np.clip(1.0 - warped["gm"] - warped["wm"], 0.0, 1.0)
    tissue = (np.argmax(np.stack([csf, warped["gm"], warped["wm"]]), axis=0) + 1).astype(np.uint8)
    tissue[~envelope] = 0
    plan = plan_lesions(lesion_rng, lesion_cfg)
    masks, cores, centres = _place_lesions(lesion_rng, plan, tissue, spacing)
    label = tissue.copy()
    lesion = np.zeros(shape, dtype=bool)
    for mask in masks:
        label[mask] = LESION
        lesion |= mask

    # tissue contrast jitter, then the lesions' own intensities, blended at their edge
    t1 = warped["t1"] * (1.0 + anatomy_rng.uniform(-0.06, 0.06) * warped["gm"]
                         + anatomy_rng.uniform(-0.06, 0.06) * warped["wm"])
    white = float(np.median(t1[tissue == HOSTS["white_matter"]]))
    value = np.zeros(shape, dtype=np.float32)
    for mask, core in zip(masks, cores):
        value[mask] = lesion_rng.uniform(*LESION_BRIGHTNESS) * white
        value[core] = lesion_rng.uniform(*CORE_DARKNESS) * white
    if lesion.any():  # each voxel outside a lesion blends with its nearest lesion voxel's value
        nearest = ndimage.distance_transform_edt(~lesion, return_distances=False, return_indices=True)
        weight = ndimage.gaussian_filter(lesion.astype(np.float32), sigma=0.6) * envelope
        weight[lesion] = 1.0
        t1 = t1 * (1.0 - weight) + value[tuple(nearest)] * weight

    bias = np.exp(0.15 * smooth_noise(anatomy_rng, shape, max_cycles=0.6))
    gain = anatomy_rng.uniform(600.0, 1000.0)
    clean = t1 * bias * gain
    sigma = 0.02 * gain
    noisy = np.sqrt((clean + anatomy_rng.normal(0, sigma, shape)) ** 2 + anatomy_rng.normal(0, sigma, shape) ** 2)
    return Subject(np.round(noisy).astype(np.int16), label, tissue, plan, masks, centres)


def build_demo_dataset(root: Path, cfg: Mapping, indices: Sequence[int] | None = None) -> None:
    """Write the demo data set into the (new or empty) folder `root`: every subject, or only those `indices`
    (the same bytes as in the full build)."""
    settings = demo_settings(cfg)
    if settings["n_subjects"] < 1:
        raise UserError(f"dataset.demo.n_subjects: need at least 1 subject, got {settings['n_subjects']}")
    templates, affine = load_templates(settings["spacing"])
    ids = subject_ids(settings["n_subjects"])
    lesions = {}
    for index in range(settings["n_subjects"]) if indices is None else indices:
        subject = make_subject(templates, settings["spacing"], subject_rngs(settings["seed"], index),
                               settings["lesions"])
        save_nifti(subject.image, affine, root / "images" / f"{ids[index]}.nii.gz")
        save_nifti(subject.label, affine, root / "labels" / f"{ids[index]}.nii.gz")
        lesions[ids[index]] = [{**asdict(lesion), "centre_voxel": list(centre), "n_voxels": int(mask.sum())}
                               for lesion, centre, mask in zip(subject.lesions, subject.centres, subject.masks)]
    (root / "lesions.json").write_text(json.dumps(lesions, indent=1) + "\n")
    if indices is None:  # marks a complete build
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
    """PNG of `n_subjects` subjects: axial and coronal slices through the largest lesion (the middle without
    one), without and with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    images = sorted((root / "images").glob("*.nii.gz"))[:n_subjects]
    if not images:
        raise UserError(f"{root}: no demo images to preview")
    colours = ListedColormap(["#00000000", "#1f77b4", "#2ca02c", "#ffdd57", "#d62728"])
    planned = json.loads((root / "lesions.json").read_text()) if (root / "lesions.json").is_file() else {}
    figure, axes = plt.subplots(len(images), 4, figsize=(9.0, 2.4 * len(images)), squeeze=False)
    for row, image_path in enumerate(images):
        image, affine = load_nifti(image_path)
        label, _ = load_nifti(root / "labels" / image_path.name)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        name = strip_nifti_suffix(image_path.name)
        components, n_components = ndimage.label(label == LESION)
        n_lesions = len(planned[name]) if name in planned else n_components
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
                axis.set_title(f"{name} {title}{f' + labels ({n_lesions} lesions)' if overlay else ''}",
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
