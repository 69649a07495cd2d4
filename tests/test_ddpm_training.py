"""Stage-2 training through the real configs, data module and training runner: checkpoint contents, the scale
factor computed once before the first step and kept on resume, validation images, CLI errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ddpm.checkpoint import load_diffusion
from ddpm_tiny import TINY_UNET, save_tiny_diffusion, save_tiny_vqgan, tiny_diffusion
from train.common import run_training
from utils.paths import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def diffusion_cfg(compose_cfg, phantom_root, run_dir, vqgan_ckpt, max_steps: int, extra=()):
    unet = [f"model.diffusion.unet.{k}={list(v) if isinstance(v, list) else v}".replace(" ", "")
            for k, v in TINY_UNET.items() if k != "decoder"]
    return compose_cfg("diffusion", [
        "dataset=nifti", f"dataset.root_dir={phantom_root}", "dataset.label_nc=3", "dataset.modality=mr",
        "dataset/intensity=percentile", "dataset.spacing=[1.0,1.0,2.0]", "dataset.crop_size=[16,16,8]",
        "dataset.num_workers=0", "dataset.name=phantom", "trainer=cpu", "logger=csv",
        f"trainer.max_steps={max_steps}", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", f"train.run_dir={run_dir}", "train.ckpt_every_n_steps=2",
        f"model.vqgan_ckpt={vqgan_ckpt}", *unet, "model.diffusion.timesteps=50", "model.scale_factor_batches=2",
        "model.validation.steps=2", "model.validation.n_volumes=1", "model.lr=1e-3", *extra])


def test_fit_checkpoint_resume_and_sampling_checkpoint(compose_cfg, phantom_root, tmp_path, monkeypatch):
    from dataset.datamodule import VolumeDataModule
    from train.lit_diffusion import LitDiffusion

    vqgan_ckpt = save_tiny_vqgan(tmp_path / "vqgan.ckpt")
    run_dir = tmp_path / "run"
    cfg = diffusion_cfg(compose_cfg, phantom_root, run_dir, vqgan_ckpt, max_steps=4,
                        extra=["model.lr_decay_start=2"])
    module = LitDiffusion(cfg)
    fits = []
    original = module._fit_scale_factor
    monkeypatch.setattr(module, "_fit_scale_factor", lambda loader: fits.append(1) or original(loader))
    losses = []
    monkeypatch.setattr(module.model, "update_ema", lambda step, f=module.model.update_ema: losses.append(
        module.model.has_scale_factor) or f(step))
    trainer = run_training(cfg, module, VolumeDataModule(cfg.dataset, run_dir))
    assert trainer.global_step == 4
    # linear decay from step 2 to 0 at step 4: the last step (3) ran at half the learning rate
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert fits == [1] and all(losses), "scale factor computed once, before the first optimiser step"
    scale = float(module.model.scale_factor)
    assert scale > 0

    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert checkpoint["stage"] == "diffusion"
    meta = checkpoint["diffusion"]
    assert meta["dataset"]["spacing"] == [1.0, 1.0, 2.0] and meta["dataset"]["modality"] == "mr"
    assert meta["intensity_reference"]["low"] < meta["intensity_reference"]["high"]
    assert meta["model"]["unet"]["base_channels"] == 8 and meta["vqgan"]["embedding_dim"] == 4
    assert (run_dir / "best.ckpt").is_file()
    assert sorted(p.name for p in (run_dir / "images").iterdir())[0].startswith("val_samples_0_step")

    # everything sampling needs is in the stage-2 checkpoint: the stage-1 file can go
    (vqgan_ckpt).unlink()
    model, meta = load_diffusion(run_dir / "last.ckpt")
    assert float(model.scale_factor) == pytest.approx(scale)
    torch.testing.assert_close(model.ema_unet.conv_in.weight, module.model.ema_unet.conv_in.weight)

    # resume: continues from step 4, keeps the scale factor (not recomputed), reads the stored reference
    save_tiny_vqgan(vqgan_ckpt)  # same weights (seeded): a resumed run rebuilds from the config first
    cfg2 = diffusion_cfg(compose_cfg, phantom_root, run_dir, vqgan_ckpt, max_steps=6,
                         extra=["model.lr_decay_start=2"])
    resumed = LitDiffusion(cfg2)
    refits = []
    monkeypatch.setattr(resumed, "_fit_scale_factor", lambda loader: refits.append(1))
    trainer = run_training(cfg2, resumed, VolumeDataModule(cfg2.dataset, run_dir))
    assert trainer.global_step == 6 and refits == []
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25e-3)  # step 5 of a decay 2 -> 6
    assert float(resumed.model.scale_factor) == pytest.approx(scale)
    assert resumed.intensity_reference == meta["intensity_reference"]
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == 6


def test_bad_settings_and_checkpoints_are_user_errors(compose_cfg, phantom_root, tmp_path):
    from train.lit_diffusion import LitDiffusion
    from utils.errors import UserError

    vqgan_ckpt = save_tiny_vqgan(tmp_path / "vqgan.ckpt")

    def build(*extra, ckpt=vqgan_ckpt):
        return LitDiffusion(diffusion_cfg(compose_cfg, phantom_root, tmp_path / "run", ckpt, 2, extra=list(extra)))

    with pytest.raises(UserError, match="crop_size"):
        build("dataset.crop_size=[16,16,6]")
    with pytest.raises(UserError, match="^model.diffusion: prediction must be one of"):
        build("model.diffusion.prediction=score")
    with pytest.raises(UserError, match="model.validation"):
        build("model.validation.sampler=euler")
    with pytest.raises(UserError, match="model.validation.steps"):
        build("model.validation.steps=51")
    stage2 = save_tiny_diffusion(tmp_path / "stage2.ckpt", tiny_diffusion())
    with pytest.raises(UserError, match="stage-2"):
        build(ckpt=stage2)


def test_cli_refuses_a_stage2_or_missing_vqgan_checkpoint(tmp_path):
    command = [sys.executable, "-m", "train.train_diffusion", f"train.run_dir={tmp_path / 'run'}",
               f"model.vqgan_ckpt={tmp_path / 'missing.ckpt'}", "logger=csv"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.ckpt" in lines[0] and lines[0].startswith("error:")
