"""Stage 1 training entry point: `python -m train.train_vqgan [overrides]` (or `bash/sbatch vqgan.sh ...`)."""
from __future__ import annotations

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from dataset.datamodule import VolumeDataModule
from train.common import run_training
from train.lit_vqgan import LitVQGAN
from utils.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../config", config_name="vqgan")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    pl.seed_everything(int(cfg.train.seed), workers=True, verbose=False)  # same initial weights for a seed
    datamodule = VolumeDataModule(cfg.dataset, cfg.train.run_dir)
    module = LitVQGAN(cfg)
    run_training(cfg, module, datamodule)


if __name__ == "__main__":
    main()
