"""Stage 2 training entry point: `python -m train.train_diffusion model.vqgan_ckpt=PATH [overrides]`
(or `bash/sbatch diffusion.sh ...`)."""
from __future__ import annotations

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from dataset.datamodule import VolumeDataModule
from train.common import run_training
from train.lit_diffusion import LitDiffusion, stage1_source
from utils.errors import exit_on_user_error
from vq_gan_3d.training import set_malloc_mmap_threshold


@hydra.main(version_base="1.3", config_path="../config", config_name="diffusion")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    set_malloc_mmap_threshold()  # CPU runs: keep peak RSS near the memory in use
    pl.seed_everything(int(cfg.train.seed), workers=True, verbose=False)  # same initial UNet for a seed
    module = LitDiffusion(cfg)  # checks the stage-1 checkpoint before any data work
    run_training(cfg, module, build_datamodule(cfg, module))


def build_datamodule(cfg: DictConfig, module: LitDiffusion) -> VolumeDataModule:
    """The data module on stage 1's patient split (written as this run's split.json), not a fresh one."""
    return VolumeDataModule(cfg.dataset, cfg.train.run_dir, split=module.stage1_split,
                            split_source=stage1_source(cfg))


if __name__ == "__main__":
    main()
