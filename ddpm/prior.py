"""A patient prior from real slices (GEM-3D's "informed slice"): keep some slices of a real scan and synthesise the
rest of the volume from the label map, consistent with them.

    python -m ddpm.sample ckpt=DIFF.ckpt labels=LABELS.nii.gz out=DIR prior_image=REAL.nii.gz prior_slices=[k1,k2]

`prior_image` is a real scan on the label map's grid (same shape and affine); `prior_slices` are indices along
the last array axis of that grid as stored in the file (the third index of the NIfTI array, before any
reorientation). It runs on the inpainting machinery (`ddpm.inpaint.inpaint_volume`): the region to regenerate
is every voxel except the kept slices (no margin), and the latent voxels the kept slices touch are known: the
real scan's latent is imposed there at every step, so the rest of the volume is denoised next to it (RePaint,
`prior_resample` re-noisings per step; a few slices are little context, so it takes more than the inpainting
CLI's default: on the phantom test 3 left a step next to the slices, 10, as in RePaint, did not). The kept slices
are the real scan's, bit for bit; their neighbours inside the same latent voxels are decoded from the real latent
(the stage-1 reconstruction of the real scan); the rest is synthetic. Output values are in the prior image's
units and dtype.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dataset.io import load_nifti, read_header
from ddpm.inpaint import InpaintSettings, inpaint_volume
from ddpm.repaint import REPAINT_SAMPLERS
from ddpm.samplers import SamplerSettings
from ddpm.synthesis import Synthesizer
from utils.errors import UserError

AFFINE_TOLERANCE_MM = 1e-3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorPlan:
    image_path: Path
    slices: tuple[int, ...]


@dataclass
class PriorCase:
    image: np.ndarray  # the prior image, on the label map's grid, native units
    affine: np.ndarray
    labels: np.ndarray
    slices: tuple[int, ...]
    settings: InpaintSettings
    names: tuple[str, str]  # (prior image, label map) for messages

    def synthesize(self, synth: Synthesizer, *, generator: torch.Generator, callback=None) -> np.ndarray:
        """The volume on the prior image's grid and dtype: its kept slices, the rest synthesised from the
        labels."""
        kept = kept_mask(self.image.shape, self.slices)
        result = inpaint_volume(synth, self.image, self.affine, self.labels, ~kept, settings=self.settings,
                                generator=generator, callback=callback,
                                names=(self.names[0], self.names[1], f"{self.names[0]} outside prior_slices"),
                                known=kept)
        return result.image


def kept_mask(shape: Sequence[int], slices: Sequence[int]) -> np.ndarray:
    """True on the kept slices (last array axis)."""
    mask = np.zeros(tuple(shape), bool)
    mask[..., list(slices)] = True
    return mask


def parse_slices(value, depth: int, name: str) -> tuple[int, ...]:
    """Slice indices: a list of distinct integers in [0, depth) that leaves something to synthesise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not len(value):
        raise UserError(f"prior_slices={value}: give a list of slice indices, e.g. prior_slices=[10,20]")
    slices = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or not 0 <= int(item) < depth:
            raise UserError(f"prior_slices={list(value)}: {item} is not a slice index of {name} (0..{depth - 1} "
                            f"along its last axis)")
        slices.append(int(item))
    if len(set(slices)) != len(slices):
        raise UserError(f"prior_slices={list(value)}: a slice is given twice")
    if len(slices) == depth:
        raise UserError(f"prior_slices={list(value)}: every slice of {name} is kept; nothing is left to synthesise")
    return tuple(sorted(slices))


def plan(cfg, label_files: list[Path], prior_files: dict[Path, Path]) -> dict[Path, PriorPlan]:
    """Check the prior settings of `ddpm.sample` and every prior image against its label map (headers only)."""
    if cfg.prior_image is None and cfg.prior_slices is None:
        return {}
    if cfg.prior_image is None or cfg.prior_slices is None:
        raise UserError(f"prior_image={cfg.prior_image}, prior_slices={cfg.prior_slices}: a patient prior needs "
                        f"both (a real scan on the label map's grid and the slices to keep)")
    if cfg.init_image is not None:
        raise UserError("prior_image and init_image: use one (a patient prior keeps slices; init_image starts "
                        "the whole volume from a part-noised scan)")
    if cfg.save_progress:
        raise UserError("save_progress=true: not available with prior_image")
    plans = {}
    slices_cfg = list(cfg.prior_slices) if not isinstance(cfg.prior_slices, int) else cfg.prior_slices
    for label_file in label_files:
        shape, affine = read_header(label_file)
        prior = prior_files[label_file]
        prior_shape, prior_affine = read_header(prior)
        if tuple(prior_shape) != tuple(shape) or not np.allclose(prior_affine, affine, atol=AFFINE_TOLERANCE_MM):
            raise UserError(f"{prior}: prior image of shape {list(prior_shape)} is not on the grid of label map "
                            f"{label_file.name} ({list(shape)}, same affine needed)")
        plans[label_file] = PriorPlan(prior, parse_slices(slices_cfg, int(shape[2]), str(prior)))
    return plans


def inpaint_settings(settings: SamplerSettings, guidance_scale: float, resample: int, timesteps: int
                     ) -> InpaintSettings:
    """The sampler settings of `ddpm.sample` as inpainting settings (no margin: the kept slices stay exact).
    RePaint steps one timestep at a time (ddpm or ddim); a multistep sampler (dpmpp_2m, the sampling default)
    becomes ddim with the same steps, logged."""
    if resample < 0:
        raise UserError(f"prior_resample={resample}: must be >= 0")
    sampler = settings.name
    if sampler not in REPAINT_SAMPLERS:
        sampler = "ddim"
        log.info("prior_slices: sampler=%s is multistep, RePaint needs ddpm or ddim; using ddim with %d steps",
                 settings.name, settings.steps)
    inpaint = InpaintSettings(sampler=sampler, steps=settings.steps, eta=settings.eta,
                              guidance_scale=guidance_scale, strength=1.0, resample=resample, margin_mm=0.0)
    inpaint.check(timesteps)
    return inpaint


def load_case(prior: PriorPlan, labels: np.ndarray, label_name: str, settings: InpaintSettings) -> PriorCase:
    image, affine = load_nifti(prior.image_path)
    return PriorCase(image=image, affine=affine, labels=labels, slices=prior.slices, settings=settings,
                     names=(str(prior.image_path), label_name))
