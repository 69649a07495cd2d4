"""Label-map generator training entry point: `python -m train.train_labels dataset=<name> [overrides]`
(or `bash/sbatch labels.sh ...`). Trains on the training split's label maps only: the split stored in
`model.split_ckpt` (the image model's stage-1 checkpoint) when given, else `dataset.split` applied anew."""
from __future__ import annotations

from collections.abc import Sequence

import hydra
import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from dataset.datamodule import VolumeDataModule
from dataset.validate import validate_dataset
from train.common import run_training
from train.lit_labels import LitLabels
from utils.errors import UserError, exit_on_user_error
from vq_gan_3d.checkpoint import load_vqgan_for_dataset
from vq_gan_3d.training import set_malloc_mmap_threshold


def volume_shape(requested, model_shapes: Sequence[Sequence[int]], multiple: Sequence[int]) -> list[int]:
    """The generated maps' shape: `requested` ([X, Y, Z], a multiple of `multiple` holding every volume), or the
    largest volume on the model grid rounded up to `multiple`."""
    largest = np.max(np.asarray(model_shapes, dtype=np.int64), axis=0)
    if requested is None:
        return [int(-(-int(n) // int(m)) * int(m)) for n, m in zip(largest, multiple)]
    shape = [int(s) for s in requested]
    if len(shape) != 3 or any(s % int(m) for s, m in zip(shape, multiple)):
        raise UserError(f"model.volume_shape={shape}: need three sizes divisible by {list(multiple)} (the "
                        f"autoencoder factor times the UNet levels)")
    if any(s < n for s, n in zip(shape, largest)):
        raise UserError(f"model.volume_shape={shape}: smaller than the largest volume of the data set on the model "
                        f"grid ({largest.tolist()}); the generator works on whole maps (use null, or a coarser "
                        f"dataset.spacing)")
    return shape


def stored_split(cfg: DictConfig) -> tuple[dict[str, list[str]] | None, str]:
    """The patient split of `model.split_ckpt` (None: split anew) and the key naming it in messages."""
    source = f"model.split_ckpt={cfg.model.split_ckpt}"
    if cfg.model.split_ckpt is None:
        return None, "split"
    return load_vqgan_for_dataset(cfg.model.split_ckpt, cfg.dataset, source)[1], source


def build_datamodule(cfg: DictConfig, module: LitLabels) -> VolumeDataModule:
    """Whole training maps padded to the generator's shape (as its crop size), on the stored split."""
    split, source = stored_split(cfg)
    summary = validate_dataset(cfg.dataset)
    module.volume_shape = volume_shape(cfg.model.volume_shape, summary.model_shapes, module.model.image_multiple)
    whole = OmegaConf.create(OmegaConf.to_container(cfg.dataset, resolve=True))
    whole.crop_size = list(module.volume_shape)
    return VolumeDataModule(whole, cfg.train.run_dir, split=split, split_source=source)


@hydra.main(version_base="1.3", config_path="../config", config_name="labels")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    set_malloc_mmap_threshold()  # CPU runs: keep peak RSS near the memory in use
    pl.seed_everything(int(cfg.train.seed), workers=True, verbose=False)  # same initial networks for a seed
    module = LitLabels(cfg)
    run_training(cfg, module, build_datamodule(cfg, module))


if __name__ == "__main__":
    main()
