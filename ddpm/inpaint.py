"""Anatomy-preserving inpainting: regenerate one region of a real scan so that it follows an edited label map.

    python -m ddpm.inpaint ckpt=DIFF.ckpt image=REAL.nii.gz labels=EDITED_LABELS.nii.gz region=MASK.nii.gz \\
        out=DIR [margin_mm=4 strength=1.0 resample=3 steps=50 sampler=ddim seed=0 overwrite=false]

The regenerated zone is the region (nonzero voxels of MASK) grown by `margin_mm`. Every voxel outside the zone
is copied from the input unchanged (same value, same dtype); inside the original region the voxels are
synthetic; across the margin the synthetic volume fades into the input (weight cos^2 of the distance to the
region), so there is no step at the zone's edge.

How: the scan, the edited label map and the zone go to the model grid; the latent voxels the zone touches are
unknown, the others are the real scan's latent. Only a box around the zone (plus half a window of context on each
side) is processed: encoded tile by tile, sampled with `ddpm.repaint` (the known latent noised to the current
level replaces the unknown outside the zone at every step, `resample` re-noisings per step, `strength` < 1 starts
from the real latent part-noised), with the UNet run window by window, and decoded tile by tile. The decoded box
goes back onto the input's grid and into native units with the input's own intensity parameters.

Outputs in `out`: `<stem>_inpainted.nii.gz` (the input's grid, affine and dtype), `<stem>_inpainted_zone.nii.gz`
(the regenerated zone), `<stem>_inpainted.png` (slices through the zone) and `<stem>_inpainted.json` (settings).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dataset.crops import IMAGE_PAD_VALUE, pad_to_multiple, unpad
from dataset.geometry import from_model_grid, to_model_grid, voxel_spacing
from dataset.io import load_nifti, save_nifti, strip_nifti_suffix
from ddpm.checkpoint import file_sha256, load_diffusion
from ddpm.inpaint_figure import save_inpaint_png
from ddpm.repaint import REPAINT_SAMPLERS, repaint
from ddpm.samplers import partial_grid
from ddpm.sample import versions
from ddpm.synthesis import Synthesizer
from ddpm.windowed import parse_window, unet_window_denoiser
from layers.tiling import encode_tiled
from utils.atomic import atomic_path, check_writable
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error

AFFINE_TOLERANCE_MM = 1e-3
ZONE_THRESHOLD = 1e-3  # model-grid voxels with more than this share of the zone (after resampling) are regenerated


@dataclass(kw_only=True)
class InpaintSettings:
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    strength: float = 1.0
    resample: int = 3
    margin_mm: float = 4.0

    def check(self, timesteps: int) -> None:
        problems = []
        if self.sampler not in REPAINT_SAMPLERS:
            problems.append(f"sampler={self.sampler}: inpainting needs one of {', '.join(REPAINT_SAMPLERS)}")
        if not 1 <= self.steps <= timesteps:
            problems.append(f"steps={self.steps}: must be between 1 and the model's {timesteps} timesteps")
        if self.eta < 0:
            problems.append(f"eta={self.eta}: must be >= 0")
        if self.guidance_scale < 0:
            problems.append(f"guidance_scale={self.guidance_scale}: must be >= 0")
        if not 0 < self.strength <= 1:
            problems.append(f"strength={self.strength}: must be in (0, 1]")
        if self.resample < 0:
            problems.append(f"resample={self.resample}: must be >= 0")
        if not self.margin_mm >= 0:
            problems.append(f"margin_mm={self.margin_mm}: must be >= 0")
        if problems:
            raise UserError(problems[0])


@dataclass
class InpaintResult:
    image: np.ndarray  # the input's grid and dtype, native units
    zone: np.ndarray  # bool, the regenerated zone (region + margin)
    box: tuple[slice, slice, slice]  # the model-grid voxels that went through the networks


# inputs -------------------------------------------------------------------------------------------------------
def check_same_grid(reference: tuple[np.ndarray, np.ndarray, str], other: tuple[np.ndarray, np.ndarray, str],
                    what: str) -> None:
    (ref_array, ref_affine, ref_name), (array, affine, name) = reference, other
    if tuple(array.shape) != tuple(ref_array.shape):
        raise UserError(f"{name}: {what} of shape {list(array.shape)} is not on the grid of the image {ref_name} "
                        f"({list(ref_array.shape)})")
    if not np.allclose(affine, ref_affine, atol=AFFINE_TOLERANCE_MM):
        raise UserError(f"{name}: {what} has another affine than the image {ref_name} (same shape, different "
                        f"position, orientation or spacing); resample it onto the image's grid")


def region_zone(region: np.ndarray, affine: np.ndarray, margin_mm: float, name: str = "region"
                ) -> tuple[np.ndarray, np.ndarray]:
    """(zone, weight): the region grown by `margin_mm` (physical distance on the voxel grid) and the share of
    the synthetic volume per voxel: 1 in the region, cos^2 falling with the distance across the margin
    (positive everywhere in the zone), 0 outside."""
    from scipy import ndimage

    core = np.asarray(region) != 0
    if not core.any():
        raise UserError(f"{name}: the region is empty (no nonzero voxel): nothing to inpaint")
    if margin_mm <= 0:
        return core, core.astype(np.float32)
    spacing = voxel_spacing(affine)
    distance = ndimage.distance_transform_edt(~core, sampling=spacing)
    zone = distance <= margin_mm
    reach = margin_mm + float(spacing.min())
    weight = np.where(zone, np.cos(np.pi / 2 * distance / reach) ** 2, 0.0).astype(np.float32)
    return zone, weight


def latent_box(unknown: np.ndarray, context: Sequence[int], multiple: int) -> tuple[slice, slice, slice]:
    """Latent box holding every unknown voxel and `context` more on each side, each side a multiple of
    `multiple` (the latent's own sides are), inside the latent."""
    box = []
    for axis, (length, extra) in enumerate(zip(unknown.shape, context)):
        hits = np.flatnonzero(unknown.any(axis=tuple(a for a in range(3) if a != axis)))
        start, stop = max(0, int(hits[0]) - extra), min(length, int(hits[-1]) + 1 + extra)
        size = min(length, -(-(stop - start) // multiple) * multiple)
        start = min(start, length - size)
        box.append(slice(start, start + size))
    return tuple(box)


# the pipeline ------------------------------------------------------------------------------------------------
def blend_back(image: np.ndarray, synthetic: np.ndarray, zone: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The input with the zone replaced by weight * synthetic + (1 - weight) * input, in the input's dtype
    (integers rounded and clipped to their range); voxels outside the zone are the input's, bit for bit."""
    out = image.copy()
    mixed = weight[zone] * synthetic[zone].astype(np.float64) + (1 - weight[zone]) * image[zone].astype(np.float64)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        mixed = np.clip(np.round(mixed), info.min, info.max)
    out[zone] = mixed.astype(image.dtype)
    return out


@torch.no_grad()
def inpaint_volume(synth: Synthesizer, image: np.ndarray, affine: np.ndarray, labels: np.ndarray,
                   region: np.ndarray, *, settings: InpaintSettings, generator: torch.Generator, callback=None,
                   names: Sequence[str] = ("image", "labels", "region"), known: np.ndarray | None = None
                   ) -> InpaintResult:
    """Inpaint `region` of `image` (native units, any grid) following `labels` (same grid), with the windows
    of `synth`. `known` (a mask on the same grid, optional): the latent voxels it touches keep the image's latent
    even where the zone touches them too; the zone's voxels there are decoded from it (a patient prior's kept
    slices, `ddpm.prior`)."""
    model, device = synth.model, synth.device
    factor = model.vqgan.downsample
    zone, weight = region_zone(region, affine, settings.margin_mm, names[2])
    prepared = synth.prepare(labels, affine, names[1])
    model_image, grid_info = to_model_grid(image, affine, synth.spacing, is_label=False)
    try:
        normalised, params = synth.normalizer.forward(model_image)
    except ValueError as err:
        raise UserError(f"{names[0]}: cannot normalise the image ({err})") from None
    padded, pads = pad_to_multiple(normalised, model.image_multiple, IMAGE_PAD_VALUE)
    latent_shape = [s // f for s, f in zip(padded.shape, factor)]

    def touched(mask: np.ndarray) -> np.ndarray:  # latent voxels holding a model-grid voxel of the mask
        on_grid = pad_to_multiple(to_model_grid(mask.astype(np.float32), affine, synth.spacing, is_label=False)[0],
                                  model.image_multiple, 0.0)[0] > ZONE_THRESHOLD
        return on_grid.reshape(latent_shape[0], factor[0], latent_shape[1], factor[1], latent_shape[2],
                               factor[2]).any(axis=(1, 3, 5))

    unknown = touched(zone)
    if known is not None:
        unknown &= ~touched(np.asarray(known) != 0)
        if not unknown.any():
            raise UserError(f"{names[2]}: every latent voxel is known; nothing is left to synthesise")
    box = latent_box(unknown, [w // 2 for w in synth.window], model.unet.required_multiple)
    image_box = tuple(slice(b.start * f, b.stop * f) for b, f in zip(box, factor))

    image_crop = torch.from_numpy(np.ascontiguousarray(padded[image_box]))[None, None]
    label_crop = synth.label_tensor(prepared)[(..., *image_box)]
    unknown_crop = torch.from_numpy(np.ascontiguousarray(unknown[box]))[None, None].to(device)
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=synth.autocast):
            known = encode_tiled(model.encode, image_crop, factor=factor, tile=synth.window,
                                 overlap=synth.window_overlap, device=device)
            denoise = unet_window_denoiser(model.ema_unet, label_crop, window=synth.window,
                                           overlap=synth.window_overlap, guidance_scale=settings.guidance_scale,
                                           windows_per_call=synth.windows_per_call)
            latent = repaint(denoise, known, unknown_crop, model.schedule, sampler=settings.sampler,
                             steps=settings.steps, eta=settings.eta, strength=settings.strength,
                             resample=settings.resample, generator=generator, callback=callback)
            decoded = synth.decode(latent, label_crop)
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        raise UserError(f"{names[0]}: ran out of memory while inpainting on {device.type} ({type(err).__name__}); "
                        f"use a smaller window=[x,y,z] or window_batch=1") from None
    result = padded.copy()
    result[image_box] = decoded[0, 0].clamp(-1, 1).numpy()
    on_grid = from_model_grid(unpad(result, pads), grid_info, is_label=False)
    synthetic = np.asarray(synth.normalizer.inverse(on_grid, params), dtype=np.float32)
    return InpaintResult(image=blend_back(np.asarray(image), synthetic, zone, weight), zone=zone, box=image_box)


# the CLI -----------------------------------------------------------------------------------------------------
def output_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    base = f"{stem}_inpainted"
    return {"nifti": out_dir / f"{base}.nii.gz", "zone": out_dir / f"{base}_zone.nii.gz",
            "png": out_dir / f"{base}.png", "json": out_dir / f"{base}.json"}


def settings_from(cfg: DictConfig) -> InpaintSettings:
    return InpaintSettings(sampler=str(cfg.sampler), steps=int(cfg.steps), eta=float(cfg.eta),
                           guidance_scale=float(cfg.guidance_scale), strength=float(cfg.strength),
                           resample=int(cfg.resample), margin_mm=float(cfg.margin_mm))


def run(cfg: DictConfig) -> Path:
    """Inpaint one scan; returns the NIfTI written."""
    settings = settings_from(cfg)
    paths = {"image": Path(str(cfg.image)), "labels": Path(str(cfg.labels)), "region": Path(str(cfg.region))}
    arrays = {name: load_nifti(path) for name, path in paths.items()}
    image, affine = arrays["image"]
    for name in ("labels", "region"):
        check_same_grid((image, affine, str(paths["image"])), (*arrays[name], str(paths[name])), name)
    if not np.any(arrays["region"][0]):
        raise UserError(f"{paths['region']}: the region is empty (no nonzero voxel): nothing to inpaint")
    out_dir = Path(str(cfg.out))
    outputs = output_paths(out_dir, strip_nifti_suffix(paths["image"].name))
    for path in outputs.values():
        check_writable(path, bool(cfg.overwrite))
    device = resolve_device(str(cfg.device))
    model, meta = load_diffusion(cfg.ckpt, map_location=device)
    settings.check(model.schedule.timesteps)
    synth = Synthesizer(model, meta, device, window=parse_window(cfg.window),
                        window_overlap=float(cfg.window_overlap), windows_per_call=int(cfg.window_batch))
    generator = torch.Generator().manual_seed(int(cfg.seed))
    steps = len(partial_grid(model.schedule.timesteps, settings.steps, settings.strength))
    started = time.perf_counter()
    with tqdm(total=steps, desc=f"inpainting {paths['image'].name}", unit="step", leave=False) as bar:
        result = inpaint_volume(synth, image, affine, arrays["labels"][0], arrays["region"][0],
                                settings=settings, generator=generator,
                                callback=lambda *_: bar.update(1),
                                names=[str(paths[n]) for n in ("image", "labels", "region")])
    seconds = time.perf_counter() - started
    overwrite = bool(cfg.overwrite)
    save_nifti(result.image, affine, outputs["nifti"], overwrite=overwrite, dtype=result.image.dtype)
    save_nifti(result.zone.astype(np.uint8), affine, outputs["zone"], overwrite=overwrite)
    save_inpaint_png(outputs["png"], image, arrays["labels"][0], result.image, result.zone, affine,
                     label_nc=synth.label_nc, overwrite=overwrite,
                     title=f"{outputs['nifti'].name} ({settings.sampler}, {settings.steps} steps, strength "
                           f"{settings.strength:g}, resample {settings.resample}, seed {int(cfg.seed)})")
    changed = result.image != image
    sidecar = {
        "output": outputs["nifti"].name, "image": paths["image"].name, "labels": paths["labels"].name,
        "region": paths["region"].name, "checkpoint": {"file": Path(str(cfg.ckpt)).name,
                                                       "sha256": file_sha256(cfg.ckpt)},
        **vars(settings), "window": list(synth.window), "window_overlap": synth.window_overlap,
        "window_batch": synth.windows_per_call,
        "seed": int(cfg.seed), "device": device.type, "seconds": round(seconds, 3),
        "region_voxels": int(np.count_nonzero(arrays["region"][0])), "zone_voxels": int(result.zone.sum()),
        "changed_voxels": int(changed.sum()), "changed_outside_zone": int((changed & ~result.zone).sum()),
        "model_grid_box": [[b.start, b.stop] for b in result.box], "dtype": str(result.image.dtype),
        "versions": versions(),
    }
    with atomic_path(outputs["json"], overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    return outputs["nifti"]


@hydra.main(version_base="1.3", config_path="../config", config_name="inpaint")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    print(run(cfg), flush=True)


if __name__ == "__main__":
    main()
