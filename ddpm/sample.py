"""Synthesis CLI: `python -m ddpm.sample ckpt=DIFF.ckpt labels=DIR_OR_FILE out=DIR [sampler=dpmpp_2m steps=25
guidance_scale=1.0 seed=0 n_per_label=1 eta=0.0 preview=false real=null save_progress=false overwrite=false
window=null window_overlap=0.25 window_batch=4 init_image=null strength=1.0 prior_image=null prior_slices=null]`.

Label maps of any extent: the UNet and the stage-1 decoder run on overlapping windows (`window`, in latent voxels;
default the training crop's latent) blended at every step, so memory depends on the window, not on the volume;
a label map whose latent fits in one window is synthesised whole. `init_image` (a real scan on the label map's
grid, or a folder of them named like the label maps) with `strength` < 1 starts from that scan's latent noised
to `strength * T` instead of pure noise (less diverse, closer to the scan). `prior_image` (a real scan on the
label map's grid, or a folder of them) with `prior_slices=[k1,k2]` (indices along the label map's last array
axis) keeps those slices of the scan and synthesises the rest consistent with them (`ddpm.prior`).

For each label map `<stem>.nii.gz` it writes `<stem>_syn<k>.nii.gz` (the label map's shape and affine, native
units, geometry-only header), `<stem>_syn<k>.png` (middle slices with the label over them) and
`<stem>_syn<k>.json` (checkpoint hash, sampler settings, seeds, package versions), plus `<stem>_syn<k>.gif` with
`preview=true` and `<stem>_syn<k>_progress.png` with `save_progress=true`.

Several tasks started together (an srun step) split the sorted label maps between them. Every input is checked
before anything is written: a missing or wrong checkpoint, an unreadable label map,
label values the model does not know, a volume too large for the device, or an output that exists (without
`overwrite=true`) stops the run with one line naming the file. Output k of a label map depends only on `seed`
and k: the same seed gives the same volumes.
"""
from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dataset.crops import unpad
from dataset.geometry import to_model_grid
from dataset.io import is_nifti_name, load_nifti, read_header, save_nifti, strip_nifti_suffix
from ddpm.checkpoint import file_sha256, load_diffusion
from ddpm.previews import save_overlay_png, save_progress_png, save_slices_gif
from ddpm.samplers import SamplerSettings, partial_grid
from ddpm.synthesis import GIB, PreparedLabel, Synthesizer
from ddpm.windowed import parse_window
from utils.atomic import atomic_path, check_writable
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error

PROGRESS_SNAPSHOTS = 6


def output_seed(seed: int, index: int) -> int:
    """Independent seed of output `index` (streams of different seeds and indices never overlap)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def find_label_files(labels: str) -> list[Path]:
    path = Path(labels)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti_name(p))
        if not files:
            raise UserError(f"{path}: no label maps (.nii or .nii.gz files) in this folder")
        return files
    if not path.exists():
        raise UserError(f"{path}: label map not found")
    return [path]


def task_share(files: list[Path]) -> list[Path]:
    """This task's share of the sorted label maps when several tasks run together (an srun step:
    SLURM_PROCID/SLURM_NTASKS, else torchrun's RANK/WORLD_SIZE): files[task::n_tasks], so each output is
    written by exactly one task."""
    for rank_var, size_var in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        rank, size = os.environ.get(rank_var), os.environ.get(size_var)
        if rank is not None and size is not None and int(size) > 1:
            return files[int(rank)::int(size)]
    return files


def find_real_files(real: str | None, label_files: list[Path], key: str = "real") -> dict[Path, Path]:
    """Real image per label map (for the preview GIF, or as `init_image`): a file (one label map) or a folder
    holding files with the label maps' names."""
    if not real:
        return {}
    path = Path(real)
    if path.is_file():
        if len(label_files) != 1:
            raise UserError(f"{path}: {key}= is one file but labels= holds {len(label_files)} label maps; "
                            f"give a folder of real images named like the label maps")
        return {label_files[0]: path}
    if not path.is_dir():
        raise UserError(f"{path}: {key} image (or folder) not found")
    matched = {}
    for label_file in label_files:
        candidate = path / label_file.name
        if not candidate.is_file():
            raise UserError(f"{candidate}: no {key} image for label map {label_file.name}")
        matched[label_file] = candidate
    return matched


def sampler_settings(cfg: DictConfig, timesteps: int) -> SamplerSettings:
    try:
        settings = SamplerSettings(str(cfg.sampler), int(cfg.steps), float(cfg.eta))
    except ValueError as err:
        raise UserError(f"sampler settings: {err}") from None
    if not 1 <= settings.steps <= timesteps:
        raise UserError(f"steps={settings.steps}: must be between 1 and the model's {timesteps} timesteps")
    return settings


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "numpy", "nibabel", "scipy", "monai"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def output_paths(out_dir: Path, stem: str, index: int, cfg: DictConfig) -> dict[str, Path]:
    base = f"{stem}_syn{index}"
    paths = {"nifti": out_dir / f"{base}.nii.gz", "png": out_dir / f"{base}.png", "json": out_dir / f"{base}.json"}
    if cfg.preview:
        paths["gif"] = out_dir / f"{base}.gif"
    if cfg.save_progress:
        paths["progress"] = out_dir / f"{base}_progress.png"
    return paths


class SnapshotRecorder:
    """Keeps x_t and the predicted x0 at a few evenly spaced steps (for the progression figure) and advances the
    progress bar."""

    def __init__(self, steps: int, bar, record: bool):
        self.bar = bar
        self.keep = set(np.linspace(0, steps - 1, PROGRESS_SNAPSHOTS).round().astype(int).tolist()) if record \
            else set()
        self.snapshots: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, index: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        self.bar.update(1)
        if index in self.keep:
            self.snapshots.append((t, x_t.detach().clone(), x0_pred.detach().clone()))


def prepare_all(cfg: DictConfig, synth: Synthesizer, label_files: list[Path], real_files: dict[Path, Path],
                out_dir: Path, guidance: float, init_files: dict[Path, Path]) -> list[tuple[Path, str]]:
    """Check every input and planned output before writing anything; returns (label file, stem) pairs."""
    jobs, stems = [], {}
    for path in label_files:
        array, affine = load_nifti(path)
        prepared = synth.prepare(array, affine, str(path))
        synth.check_fits(prepared, guidance)
        if path in real_files:
            real_shape = read_header(real_files[path])[0]
            if tuple(real_shape) != tuple(array.shape):
                raise UserError(f"{real_files[path]}: real image of shape {list(real_shape)} is not on the grid of "
                                f"label map {path.name} ({list(array.shape)})")
        if path in init_files:
            init_shape, init_affine = read_header(init_files[path])
            if tuple(init_shape) != tuple(array.shape) or not np.allclose(init_affine, affine, atol=1e-3):
                raise UserError(f"{init_files[path]}: initial image of shape {list(init_shape)} is not on the grid "
                                f"of label map {path.name} ({list(array.shape)}, same affine needed)")
        stem = strip_nifti_suffix(path.name)
        if stem in stems:
            raise UserError(f"{path}: same name as {stems[stem]}; outputs would collide")
        stems[stem] = path
        for index in range(int(cfg.n_per_label)):
            for output in output_paths(out_dir, stem, index, cfg).values():
                check_writable(output, bool(cfg.overwrite))
        jobs.append((path, stem))
    return jobs


def synthesize_one(cfg: DictConfig, synth: Synthesizer, prepared: PreparedLabel, paths: dict[str, Path], *,
                   settings: SamplerSettings, index: int, real: np.ndarray | None, ckpt_info: dict,
                   init: np.ndarray | None = None, init_name: str | None = None, prior=None) -> None:
    """`prior`: a `ddpm.prior.PriorCase` (real slices to keep), or None."""
    seed = output_seed(int(cfg.seed), index)
    generator = torch.Generator().manual_seed(seed)
    strength = float(cfg.strength) if init is not None else 1.0
    steps = len(partial_grid(synth.model.schedule.timesteps, settings.steps, strength))
    started = time.perf_counter()
    with tqdm(total=steps, desc=f"{paths['nifti'].name}", unit="step", leave=False) as bar:
        recorder = SnapshotRecorder(steps, bar, bool(cfg.save_progress))
        if prior is None:
            model_grid = synth.sample(prepared, settings=settings, guidance_scale=float(cfg.guidance_scale),
                                      generator=generator, callback=recorder, init=init, strength=strength)
            native, image_model = synth.to_native(model_grid, prepared), synth.native_units(model_grid)
        else:
            native = prior.synthesize(synth, generator=generator, callback=recorder)
            image_model = to_model_grid(native, prior.affine, synth.spacing, is_label=False)[0]
    seconds = time.perf_counter() - started
    overwrite = bool(cfg.overwrite)
    save_nifti(native, prepared.grid_info.original_affine, paths["nifti"], overwrite=overwrite, dtype=native.dtype)

    label_model = unpad(prepared.label, prepared.pads)
    spacing = synth.spacing
    save_overlay_png(paths["png"], image_model, label_model, spacing, synth.label_nc,
                     title=f"{paths['nifti'].name} ({settings.name}, {settings.steps} steps, "
                           f"guidance {float(cfg.guidance_scale):g}, seed {int(cfg.seed)})", overwrite=overwrite)
    if "gif" in paths:
        panels = [("label", label_model), ("synthetic", image_model)]
        if real is not None:
            panels.append(("real", real))
        save_slices_gif(paths["gif"], panels, synth.label_nc, overwrite=overwrite)
    if "progress" in paths:
        snapshots = [(t, synth.native_units(synth.decode_latent(x_t, prepared)),
                      synth.native_units(synth.decode_latent(x0, prepared))) for t, x_t, x0 in recorder.snapshots]
        save_progress_png(paths["progress"], snapshots, overwrite=overwrite)
    grid = synth.latent_grid(prepared)
    sidecar = {
        "output": paths["nifti"].name, "label_map": Path(prepared.name).name, "checkpoint": ckpt_info,
        "sampler": settings.name, "steps": settings.steps, "eta": settings.eta,
        "guidance_scale": float(cfg.guidance_scale), "seed": int(cfg.seed), "index": index, "output_seed": seed,
        "device": synth.device.type, "seconds": round(seconds, 3),
        "window": list(grid.size), "windows": len(grid), "window_overlap": synth.window_overlap, "window_batch": synth.windows_per_call,
        "init_image": init_name, "strength": strength,
        **({} if prior is None else {"prior_image": Path(prior.names[0]).name, "prior_slices": list(prior.slices),
                                     "resample": prior.settings.resample, "sampler": prior.settings.sampler}),
        "model_grid_shape": [int(s) for s in prepared.model_shape], "model_spacing_mm": spacing,
        "modality": synth.modality, "dtype": str(native.dtype), "versions": versions(),
    }
    with atomic_path(paths["json"], overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")


def run(cfg: DictConfig) -> list[Path]:
    """Synthesise for every label map of `cfg.labels`; returns the NIfTI files written."""
    device = resolve_device(str(cfg.device))
    if int(cfg.n_per_label) < 1:
        raise UserError(f"n_per_label={cfg.n_per_label}: must be at least 1")
    if float(cfg.guidance_scale) < 0:
        raise UserError(f"guidance_scale={cfg.guidance_scale}: must be >= 0")
    if not 0 < float(cfg.strength) <= 1:
        raise UserError(f"strength={cfg.strength}: must be in (0, 1]")
    if (cfg.init_image is None) != (float(cfg.strength) == 1.0):
        raise UserError(f"strength={cfg.strength}, init_image={cfg.init_image}: a partial-noise start needs both "
                        f"init_image=REAL.nii.gz and strength < 1")
    label_files = task_share(find_label_files(str(cfg.labels)))
    real_files = find_real_files(cfg.real, label_files)
    init_files = find_real_files(cfg.init_image, label_files, key="init_image")
    from ddpm import prior as patient_prior  # here: ddpm.prior -> ddpm.inpaint imports this module

    priors = patient_prior.plan(cfg, label_files, find_real_files(cfg.prior_image, label_files, key="prior_image"))
    model, meta = load_diffusion(cfg.ckpt, map_location=device)
    settings = sampler_settings(cfg, model.schedule.timesteps)
    prior_settings = (patient_prior.inpaint_settings(settings, float(cfg.guidance_scale), int(cfg.prior_resample),
                                                     model.schedule.timesteps) if priors else None)
    limit = None if cfg.memory_limit_gb is None else int(float(cfg.memory_limit_gb) * GIB)
    synth = Synthesizer(model, meta, device, memory_limit_bytes=limit, window=parse_window(cfg.window),
                        window_overlap=float(cfg.window_overlap), windows_per_call=int(cfg.window_batch))
    out_dir = Path(str(cfg.out))
    jobs = prepare_all(cfg, synth, label_files, real_files, out_dir, float(cfg.guidance_scale), init_files)
    ckpt_info = {"file": Path(str(cfg.ckpt)).name, "sha256": file_sha256(cfg.ckpt)}
    written = []
    for path, stem in tqdm(jobs, desc="label maps", unit="map"):
        array, affine = load_nifti(path)
        prepared = synth.prepare(array, affine, str(path))
        real = init = None
        if path in real_files:
            real_array, real_affine = load_nifti(real_files[path])
            real = to_model_grid(real_array, real_affine, synth.spacing, is_label=False)[0]
        if path in init_files:
            init = synth.prepare_init(*load_nifti(init_files[path]), str(init_files[path]), prepared)
        prior = patient_prior.load_case(priors[path], array, str(path), prior_settings) if path in priors else None
        for index in range(int(cfg.n_per_label)):
            paths = output_paths(out_dir, stem, index, cfg)
            synthesize_one(cfg, synth, prepared, paths, settings=settings, index=index, real=real,
                           ckpt_info=ckpt_info, init=init,
                           init_name=init_files[path].name if path in init_files else None, prior=prior)
            written.append(paths["nifti"])
    return written


@hydra.main(version_base="1.3", config_path="../config", config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    for path in run(cfg):
        print(path, flush=True)


if __name__ == "__main__":
    main()
