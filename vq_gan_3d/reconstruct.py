"""Reconstruct NIfTI volumes through a trained stage 1, on each input's own grid and affine, in native units:

    python -m vq_gan_3d.reconstruct ckpt=PATH images=DIR out=DIR [labels=DIR] [overlap=0.25]

Each image is put on the model grid (RAS, the training spacing), normalised as in training (its own intensity
parameters), reconstructed in overlapping windows of the training crop size blended with sin^2 ramps (the
one tiling scheme, `layers.tiling`), mapped back to native units and onto the input grid, and written as
`<out>/<same file name>` with the input's affine.
The SPADE decoder also needs the label maps (`labels=DIR`, same file names).
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from dataset.crops import IMAGE_PAD_VALUE, LABEL_PAD_VALUE, pad_to_at_least, unpad
from dataset.geometry import from_model_grid, to_model_grid
from dataset.intensity import build_normalizer
from dataset.io import is_nifti_name, load_nifti, save_nifti
from layers.tiling import tiled_apply
from utils.atomic import check_writable
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error
from vq_gan_3d.checkpoint import load_vqgan, read_checkpoint
from vq_gan_3d.model import VQGAN

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct_normalised(model: VQGAN, image: np.ndarray, label: np.ndarray | None, *, window: list[int],
                           overlap: float, device: torch.device) -> np.ndarray:
    """(X, Y, Z) normalised volume (and label map) on the model grid -> its reconstruction, same shape: the model
    runs on overlapping windows of `window` voxels, blended as every tiled call is (`layers.tiling`)."""
    padded, pads = pad_to_at_least(np.asarray(image, dtype=np.float32), window, IMAGE_PAD_VALUE)
    image_t = torch.from_numpy(np.ascontiguousarray(padded))[None, None]
    label_t = None
    if label is not None:
        label_padded, _ = pad_to_at_least(np.asarray(label, dtype=np.int64), window, LABEL_PAD_VALUE)
        label_t = torch.from_numpy(np.ascontiguousarray(label_padded))[None, None]

    def predictor(tile: torch.Tensor, tile_label: torch.Tensor | None) -> torch.Tensor:
        recon, _ = model(tile, tile_label)
        return recon.float().clamp(-1, 1)

    out = tiled_apply(predictor, image_t, label_t, window=window, overlap=overlap, device=device, out_device="cpu")
    return unpad(out[0, 0].numpy(), pads)


def nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti_name(p))
    if not files:
        raise UserError(f"{folder}: no .nii or .nii.gz files")
    return files


def reconstruct_folder(cfg: DictConfig) -> list[Path]:
    ckpt = Path(str(cfg.ckpt))
    meta = read_checkpoint(ckpt)["vqgan"]
    dataset = meta.get("dataset")
    if not isinstance(dataset, dict) or not {"spacing", "intensity", "crop_size"} <= set(dataset):
        raise UserError(f"{ckpt}: the checkpoint does not record its training grid and intensities")
    device = resolve_device(str(cfg.device))
    model = load_vqgan(ckpt, map_location=device)
    if model.is_spade and not cfg.labels:
        raise UserError(f"{ckpt}: this VQ-GAN has a SPADE decoder; pass labels=DIR with the label maps")
    if not 0.0 <= float(cfg.overlap) < 1.0:
        raise UserError(f"overlap: must be in [0, 1), got {cfg.overlap}")
    normalizer = build_normalizer(dataset["intensity"])
    images = nifti_files(Path(str(cfg.images)))
    out_dir = Path(str(cfg.out))
    for path in images:  # refuse before any work rather than after half the folder
        check_writable(out_dir / path.name, bool(cfg.overwrite))
    written = []
    for path in images:
        array, affine = load_nifti(path)
        model_image, grid = to_model_grid(array, affine, dataset["spacing"], is_label=False)
        normalised, params = normalizer.forward(model_image)
        label = None
        if model.is_spade:
            label = _model_grid_label(Path(str(cfg.labels)) / path.name, grid.model_shape, dataset, model.label_nc)
        recon = reconstruct_normalised(model, normalised, label, window=list(dataset["crop_size"]),
                                       overlap=float(cfg.overlap), device=device)
        native = np.asarray(normalizer.inverse(recon, params), dtype=np.float32)
        written.append(save_nifti(from_model_grid(native, grid, is_label=False), grid.original_affine,
                                  out_dir / path.name, overwrite=bool(cfg.overwrite)))
        log.info("%s: reconstructed -> %s", path.name, written[-1])
    return written


def _model_grid_label(path: Path, shape: tuple, dataset: dict, label_nc: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: label map not found (labels=DIR must hold one per image, same file name)")
    array, affine = load_nifti(path)
    label, grid = to_model_grid(np.rint(array).astype(np.int64), affine, dataset["spacing"], is_label=True)
    if tuple(grid.model_shape) != tuple(shape):
        raise UserError(f"{path}: label map grid {list(grid.model_shape)} does not match its image's {list(shape)}")
    if label.min() < 0 or label.max() >= label_nc:
        raise UserError(f"{path}: label values must be in [0, {label_nc}), found {int(label.min())}..{int(label.max())}")
    return label


@hydra.main(version_base="1.3", config_path="../config", config_name="reconstruct")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    reconstruct_folder(cfg)


if __name__ == "__main__":
    main()
