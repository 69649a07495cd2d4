"""Stage-1 training: overfitting, exact resume through train.common.run_training, the demo experiment, and the
encode / reconstruct command-line tools on a trained checkpoint."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from conftest import compose
from train import common
from train.lit_vqgan import LitVQGAN
from vq_gan_3d.checkpoint import load_vqgan
from vq_gan_3d.model import VQGAN

TINY = ["model.vqgan.base_channels=4", "model.vqgan.channel_mult=[1,2]", "model.vqgan.downsample=[2,2,2]",
        "model.vqgan.norm_groups=2", "model.vqgan.num_codes=32", "model.vqgan.embedding_dim=4",
        "model.loss.disc_channels=4", "model.loss.disc_layers=2", "model.loss.perceptual_weight=0",
        "model.val_image_volumes=1"]
DEMO_DATA = ["dataset.demo.n_subjects=6", "dataset.spacing=[6.0,6.0,6.0]", "dataset.crop_size=[32,32,16]",
             "dataset.num_workers=0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to other processes holding the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class FixedCrops(pl.LightningDataModule):
    """Four fixed smooth 16x16x8 crops with labels, in order (2 batches per epoch), and one validation crop."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        smooth = torch.nn.functional.avg_pool3d(torch.randn(5, 1, 20, 20, 12, generator=g), 5, stride=1)
        self.items = [{"image": torch.tanh(3 * smooth[i]), "label": (smooth[i] > 0).long() + (smooth[i] > 0.2),
                       "case_id": f"crop{i}"} for i in range(5)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items[:4], batch_size=2, shuffle=False)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.items[4:], batch_size=1)


def run_cfg(run_dir, max_steps, extra=()):
    return compose("vqgan", [*TINY, "trainer=cpu", "logger=csv", f"train.run_dir={run_dir}",
                             f"trainer.max_steps={max_steps}", "trainer.val_check_interval=2",
                             "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
                             "train.ckpt_every_n_steps=2", *extra])


def test_overfitting_one_crop_lowers_l1_by_a_large_factor():
    torch.manual_seed(0)
    image = FixedCrops().items[0]["image"][None]
    model = VQGAN(base_channels=8, channel_mult=(1, 2), downsample=(2, 2, 2), num_codes=64, embedding_dim=4,
                  norm_groups=4).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        recon, info = model(image)
        l1 = (recon - image).abs().mean()
        opt.zero_grad()
        (l1 + info["commitment_loss"]).backward()
        opt.step()
        losses.append(float(l1))
    assert losses[-1] < losses[0] / 8, (losses[0], losses[-1])


def test_resume_continues_exactly(tmp_path):
    """k + m steps in one run == k steps, stop, resume, m steps: weights, codebook, discriminators, optimisers.
    The GAN starts at step 1 and dead codes restart (grace 1 / (1 - ema_decay) = 2 steps), so every part of the
    state is exercised."""
    extra = ["model.loss.gan_start_step=1", "model.vqgan.dead_code_threshold=1.0", "model.vqgan.ema_decay=0.5",
             "model.vqgan.gradient_checkpointing=true", "model.lr_decay_start=2"]

    def run(run_dir, max_steps):
        pl.seed_everything(0, verbose=False)
        module = LitVQGAN(run_cfg(run_dir, max_steps, extra))
        trainer = common.run_training(run_cfg(run_dir, max_steps, extra), module, FixedCrops())
        return module, trainer

    continuous, trainer = run(tmp_path / "continuous", 4)
    assert trainer.global_step == 4  # discriminator steps do not count as iterations
    run(tmp_path / "resumed", 2)
    resumed, trainer = run(tmp_path / "resumed", 4)
    assert trainer.global_step == 4
    assert int(resumed.vqgan.quantizer.num_updates) == int(continuous.vqgan.quantizer.num_updates) == 4
    for key, value in continuous.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    ckpt_a = torch.load(tmp_path / "continuous" / "last.ckpt", weights_only=True)
    ckpt_b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    assert len(ckpt_a["optimizer_states"]) == 2
    # linear decay from step 2 to 0 at step 4: the last step (3) ran at half the learning rate
    lr = run_cfg(tmp_path, 4).model.lr
    for ckpt in (ckpt_a, ckpt_b):
        assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.5 * lr)
    for opt_a, opt_b in zip(ckpt_a["optimizer_states"], ckpt_b["optimizer_states"]):
        for (_, state_a), (_, state_b) in zip(sorted(opt_a["state"].items()), sorted(opt_b["state"].items())):
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-4, atol=1e-7)
    # the Lightning checkpoint is a stage-1 checkpoint
    assert ckpt_a["stage"] == "vqgan"
    loaded = load_vqgan(tmp_path / "continuous" / "last.ckpt")
    assert loaded.hparams == continuous.vqgan.hparams
    assert (tmp_path / "continuous" / "best.ckpt").is_file()
    metrics = (tmp_path / "continuous" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/psnr_range2" in metrics and "val/ssim_range2" in metrics and "train/d_loss" in metrics
    assert list((tmp_path / "continuous" / "images").glob("val_reconstruction_0_step*.png"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_cfg):
    """The real demo experiment (model settings as shipped, GAN and perceptual loss on) for 3 steps on the small
    demo data of conftest, through the training entry point's own steps, in bf16 autocast (what the demo's
    `precision: auto` gives on a CPU with bf16 instructions; emulated elsewhere)."""
    run_dir = tmp_path_factory.mktemp("vqgan_demo")
    cfg = compose("vqgan", ["experiment=demo", *DEMO_DATA, f"train.run_dir={run_dir}", "trainer.max_steps=3",
                            "trainer.val_check_interval=3", "model.loss.gan_start_step=1",
                            "trainer.enable_progress_bar=false", "trainer.precision=bf16-mixed"])
    assert cfg.trainer.accelerator == "cpu" and cfg.model.loss.perceptual_backbone == "inception"
    from dataset.datamodule import VolumeDataModule

    pl.seed_everything(0, verbose=False)
    module = LitVQGAN(cfg)
    trainer = common.run_training(cfg, module, VolumeDataModule(cfg.dataset, cfg.train.run_dir))
    return run_dir, cfg, trainer


def test_demo_experiment_composes_and_trains(demo_run):
    run_dir, cfg, trainer = demo_run
    assert trainer.global_step == 3
    assert {"val/l1", "val/psnr_range2", "val/ssim_range2", "val/psnr_range2_blur1", "val/ssim_range2_blur2",
            "train/d_loss", "train/perceptual", "train/lesion_l1"} <= set(trainer.callback_metrics)
    assert (run_dir / "last.ckpt").is_file() and (run_dir / "split.json").is_file()
    demo = compose("vqgan", ["experiment=demo"])
    assert demo.model.loss.gan_start_step > 0 and demo.model.loss.perceptual_weight > 0
    assert demo.trainer.precision == "auto" and trainer.precision == "bf16-mixed"


def test_encode_writes_latents_of_the_stored_split(demo_run, tmp_path):
    from vq_gan_3d.encode import encode_dataset

    run_dir, _, _ = demo_run
    stored = torch.load(run_dir / "last.ckpt", weights_only=True)["vqgan"]["split"]
    assert stored == json.loads((run_dir / "split.json").read_text())  # the checkpoint carries the run's split
    cfg = compose("encode", [*DEMO_DATA, f"ckpt={run_dir / 'last.ckpt'}", f"out_dir={tmp_path}"])
    encode_dataset(cfg)
    manifest = json.loads((tmp_path / "latents.json").read_text())
    assert manifest["cases"] == {c: name for name in ("train", "val") for c in stored[name]}
    files = sorted(tmp_path.glob("train/*.npz"))
    assert [f.stem for f in files] == sorted(stored["train"]) and sorted(tmp_path.glob("val/*.npz"))
    latents = [np.load(f)["latent"] for f in files]
    model = load_vqgan(run_dir / "last.ckpt")
    assert all(z.shape[0] == model.embedding_dim for z in latents)
    sample = np.load(files[0])
    assert sample["label"].shape == tuple(s * f for s, f in zip(sample["latent"].shape[1:], model.downsample))


def test_reconstruct_writes_nifti_on_the_input_grid_in_native_units(demo_run, demo_cfg, tmp_path):
    from vq_gan_3d.reconstruct import reconstruct_folder

    run_dir, _, _ = demo_run
    images = sorted((__import__("dataset.demo", fromlist=["x"]).ensure_demo_dataset(demo_cfg) / "images").iterdir())
    folder, labels = tmp_path / "in", tmp_path / "labels"
    folder.mkdir()
    labels.mkdir()
    for path in images[:2]:
        (folder / path.name).symlink_to(path)
        (labels / path.name).symlink_to(path.parent.parent / "labels" / path.name)
    written = reconstruct_folder(compose("reconstruct", [f"ckpt={run_dir / 'last.ckpt'}", f"images={folder}",
                                                         f"labels={labels}", f"out={tmp_path / 'out'}",
                                                         "device=cpu"]))  # the demo decoder is SPADE
    assert len(written) == 2
    for source, out in zip(images[:2], written):
        a, b = nib.load(source), nib.load(out)
        assert a.shape == b.shape and np.allclose(a.affine, b.affine)
        data, recon = a.get_fdata(), b.get_fdata()
        assert recon.min() >= data.min() - 1 and recon.max() <= data.max() * 1.5  # native units, not [-1, 1]
        assert recon.max() > 10


def test_reference_blur_is_a_normalised_separable_gaussian():
    from evaluation.metrics import gaussian_window_3d
    from train.lit_vqgan import gaussian_blur

    constant = torch.full((1, 1, 9, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, 1.0), constant)
    impulse = torch.zeros(1, 1, 15, 15, 15)
    impulse[..., 7, 7, 7] = 1.0
    window = gaussian_window_3d(7, 1.0).float()  # radius 3 sigma
    torch.testing.assert_close(gaussian_blur(impulse, 1.0)[0, 0, 4:11, 4:11, 4:11], window)


def test_spade_model_config_trains_and_loads(tmp_path):
    cfg = compose("vqgan", ["model=vqgan_spade", *TINY[1:], "model.vqgan.base_channels=4", "trainer=cpu", "logger=csv",
                            f"train.run_dir={tmp_path}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                            "trainer.enable_progress_bar=false", "model.loss.gan_start_step=1"])
    module = LitVQGAN(cfg)
    assert module.vqgan.is_spade and module.vqgan.label_nc == cfg.dataset.label_nc
    assert module.vqgan.mask_compressor is not None
    common.run_training(cfg, module, FixedCrops())
    loaded = load_vqgan(tmp_path / "last.ckpt")
    assert loaded.is_spade
    image, label = FixedCrops().items[4]["image"][None], FixedCrops().items[4]["label"][None]
    with torch.no_grad():
        assert loaded.decode(loaded.encode(image), label).shape == image.shape


def test_lesion_l1_reads_the_data_sets_lesion_classes(tmp_path):
    label = torch.tensor([0, 1, 2, 3, 4, 4]).view(1, 1, 6, 1, 1)
    weighted = LitVQGAN(run_cfg(tmp_path, 1, extra=["model.loss.lesion_l1_weight=1.0"]))  # demo: lesion = class 4
    assert weighted._lesion_mask(label).flatten().tolist() == [False] * 4 + [True] * 2
    assert LitVQGAN(run_cfg(tmp_path, 1, extra=["model.loss.lesion_l1_weight=0"]))._lesion_mask(label) is None
    no_lesion_class = LitVQGAN(run_cfg(tmp_path, 1, extra=["model.loss.lesion_l1_weight=1.0",
                                                           "dataset.lesion_classes=[]"]))
    assert no_lesion_class._lesion_mask(label) is None
