"""The shared training runner: checkpoints, resume, precision, image grid."""
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from train import common


class TinyRegression(pl.LightningModule):
    monitor = "val/loss"

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return ((batch - self.weight) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", ((batch - self.weight) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(torch.randn(8, 3, generator=g) + 2.0, batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.full((2, 3), 2.0), batch_size=2)


def make_cfg(run_dir: Path, max_steps: int, resume: str = "auto"):
    return OmegaConf.create(
        {
            "train": {"seed": 0, "run_dir": str(run_dir), "resume": resume, "ckpt_every_n_steps": 2},
            "trainer": {
                "accelerator": "cpu", "devices": 1, "precision": "auto", "max_steps": max_steps,
                "val_check_interval": 2, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
                "enable_progress_bar": False,
            },
            "logger": {"_target_": "pytorch_lightning.loggers.CSVLogger", "save_dir": str(run_dir), "name": "logs"},
        }
    )


def test_checkpoints_written_and_resume_continues_the_step_count(tmp_path):
    module = TinyRegression()
    trainer = common.run_training(make_cfg(tmp_path, max_steps=4), module, TinyData())
    assert trainer.global_step == 4
    assert (tmp_path / "last.ckpt").is_file() and (tmp_path / "best.ckpt").is_file()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4

    # A second run in the same directory resumes: it starts at step 4 and stops at 6.
    resumed = TinyRegression()
    trainer = common.run_training(make_cfg(tmp_path, max_steps=6), resumed, TinyData())
    assert trainer.global_step == 6
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6

    # Continuous 6 steps give the same weights as 4 + resume + 2.
    continuous = TinyRegression()
    common.run_training(make_cfg(tmp_path / "continuous", max_steps=6), continuous, TinyData())
    torch.testing.assert_close(continuous.weight, resumed.weight)


def test_resume_never_and_missing_path(tmp_path):
    assert common.find_resume_checkpoint(tmp_path, "never") is None
    assert common.find_resume_checkpoint(tmp_path, "auto") is None
    try:
        common.find_resume_checkpoint(tmp_path, str(tmp_path / "nope.ckpt"))
    except common.UserError as err:
        assert "nope.ckpt" in str(err)
    else:
        raise AssertionError("a missing resume checkpoint must be refused")


def test_resume_auto_takes_last_ckpt_only(tmp_path):
    (tmp_path / "best.ckpt").write_bytes(b"b")
    assert common.find_resume_checkpoint(tmp_path, "auto") is None  # best.ckpt is not a training state to resume
    (tmp_path / "last.ckpt").write_bytes(b"a")
    assert common.find_resume_checkpoint(tmp_path, "auto") == str(tmp_path / "last.ckpt")


def test_image_grid_layout():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    grid = common.image_grid([[a, a], [a]], pad=1)
    # two rows of tiles 4x3 (rotated), two columns
    assert grid.shape == (2 * (4 + 1) + 1, 2 * (3 + 1) + 1)
    assert grid.min() == 0.0 and grid.max() == 1.0


def test_lr_factor_is_one_then_a_linear_decay_to_zero():
    assert [common.lr_factor(s, 4, 8) for s in (0, 3, 4, 6, 8, 9)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert common.lr_factor(100, None, 8) == 1.0 and common.lr_factor(5, 8, 8) == 1.0  # off; starts at the end
