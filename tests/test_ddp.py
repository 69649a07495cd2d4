"""Distributed training on CPU: 2 processes over gloo, started like the tasks of an srun step (ddp_harness.py),
through the shared runner train.common.run_training, with the real stage-1 and stage-2 LightningModules, and
sampling split across the tasks of a job. The runner's own rules (requeue, validation metrics, seeding) are in
test_ddp_runner.py.

One pair of processes runs every scenario in turn (the `ddp_results` fixture) and the tests below check what
each scenario recorded; a scenario that raised reports its traceback to its own tests only.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from conftest import compose
from ddp_harness import check, run_tasks, trainer_settings

DEMO = ["experiment=demo", "dataset.demo.n_subjects=6", "dataset.spacing=[6.0,6.0,6.0]",
        "dataset.crop_size=[32,32,16]", "dataset.num_workers=0", "dataset.batch_size=1"]
# ema_vq, not the demo's kl: these tests compare the codebook (EMA sums, restarts) across ranks
VQGAN_TINY = ["model.vqgan.quantizer=ema_vq", "model.vqgan.base_channels=4", "model.vqgan.channel_mult=[1,1,1]",
              "model.vqgan.norm_groups=2", "model.vqgan.num_codes=32", "model.vqgan.embedding_dim=4",
              "model.loss.perceptual_weight=0", "model.loss.disc_channels=4", "model.loss.disc_layers=2",
              "model.vqgan.gradient_checkpointing=false", "model.val_image_volumes=0"]
DIFFUSION_TINY = ["model.diffusion.unet.base_channels=8", "model.diffusion.unet.channel_mult=[1,2]",
                  "model.diffusion.unet.attention_levels=[]", "model.diffusion.unet.head_channels=8",
                  "model.diffusion.unet.group_width=4", "model.diffusion.unet.norm_groups=4",
                  "model.diffusion.unet.mask_channels=4", "model.diffusion.unet.mask_hidden_channels=4",
                  "model.diffusion.unet.spade_hidden_channels=8", "model.diffusion.timesteps=50",
                  "model.scale_factor_batches=2", "model.validation.steps=2", "model.validation.n_volumes=0"]


def stage_cfg(config_name, overrides, run_dir, *, max_steps, devices=2, val_check_interval=100, resume="auto"):
    """A real top-level config (vqgan.yaml / diffusion.yaml) with the trainer set for this test."""
    cfg = compose(config_name, [*DEMO, *overrides, f"train.run_dir={run_dir}", f"train.resume={resume}",
                                "logger=csv"])
    OmegaConf.set_struct(cfg, False)
    cfg.trainer = trainer_settings(max_steps=max_steps, devices=devices, val_check_interval=val_check_interval)
    return cfg


def fingerprint(tensors) -> str:
    """Exact identity of a list of tensors."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def codebook_state(lit) -> dict:
    q = lit.vqgan.quantizer
    return {name: getattr(q, name).tolist() for name in ("embedding", "cluster_size", "embed_sum", "num_updates")}


# --------------------------------------------------------------------------------------------------------------
# Stage 1 on the demo data, GAN and dead-code restarts on: every rank ends with the same codebook and weights.

def vqgan_task(rank, out_dir):
    from dataset.datamodule import VolumeDataModule
    from train import common
    from train.lit_vqgan import LitVQGAN

    cfg = stage_cfg("vqgan", [*VQGAN_TINY, "model.loss.gan_start_step=2"], out_dir, max_steps=5, val_check_interval=5)
    lit = LitVQGAN(cfg)
    trainer = common.run_training(cfg, lit, VolumeDataModule(cfg.dataset, cfg.train.run_dir))
    return {"step": trainer.global_step, "codebook": codebook_state(lit),
            "initialized": bool(lit.vqgan.quantizer.initialized),
            "weights": fingerprint(lit.parameters()), "val_l1": float(trainer.callback_metrics["val/l1"])}


def test_stage1_codebook_and_weights_are_identical_on_every_rank(ddp_results):
    r0, r1 = (check(r["vqgan"]) for r in ddp_results["ranks"])
    assert r0["step"] == r1["step"] == 5
    assert r0["initialized"] and r1["initialized"]
    assert r0["codebook"] == r1["codebook"]  # exactly: EMA sums reduced over ranks, restarts broadcast
    assert r0["codebook"]["num_updates"] == 5
    assert r0["weights"] == r1["weights"]  # autoencoder and both discriminators
    assert r0["val_l1"] == r1["val_l1"]


# Stage 1, 2 processes x 2 crops against 1 process x the same 4 crops, from the same initialised codebook.

class FixedCrops(pl.LightningDataModule):
    """Four fixed 32x32x16 crops (in order, no shuffling) and one validation crop."""

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        smooth = torch.nn.functional.avg_pool3d(torch.randn(5, 1, 36, 36, 20, generator=g), 5, stride=1)
        self.items = [{"image": torch.tanh(2 * smooth[i]), "label": (smooth[i] > 0).long() + (smooth[i] > 0.3),
                       "case_id": f"crop{i}"} for i in range(5)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items[:4], batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.items[4:], batch_size=1)


EQUIVALENCE = [*VQGAN_TINY, "model.loss.gan_start_step=1000", "model.vqgan.dead_code_threshold=0.0"]


def vqgan_equivalence_run(out_dir, *, devices, batch_size, max_steps, resume="auto"):
    from train import common
    from train.lit_vqgan import LitVQGAN

    cfg = stage_cfg("vqgan", EQUIVALENCE, out_dir, max_steps=max_steps, devices=devices, resume=resume)
    pl.seed_everything(0, verbose=False)
    lit = LitVQGAN(cfg)
    common.run_training(cfg, lit, FixedCrops(batch_size))
    return {"weights": [p.detach().double().sum().item() for p in lit.vqgan.parameters()],
            "codebook": codebook_state(lit)}


def vqgan_equivalence_task(rank, out_dir):
    start = out_dir.parent.parent / "start" / "last.ckpt"
    return vqgan_equivalence_run(out_dir, devices=2, batch_size=2, max_steps=4, resume=str(start))


def test_stage1_two_processes_match_one_process_with_the_same_global_batch(ddp_results):
    one = ddp_results["single"]
    for two in (check(r["vqgan_equivalence"]) for r in ddp_results["ranks"]):
        np.testing.assert_allclose(two["weights"], one["weights"], rtol=1e-4, atol=1e-5)
        for name in ("embedding", "cluster_size", "embed_sum"):
            np.testing.assert_allclose(two["codebook"][name], one["codebook"][name], rtol=1e-4, atol=1e-5)
        assert two["codebook"]["num_updates"] == one["codebook"]["num_updates"] == 4


# --------------------------------------------------------------------------------------------------------------
# Stage 2: the latent scale factor comes from every rank's latents and is the same everywhere.

def diffusion_task(rank, out_dir):
    from dataset.datamodule import VolumeDataModule
    from train import common
    from train.lit_diffusion import LitDiffusion

    vqgan_ckpt = out_dir.parent.parent / "single" / "last.ckpt"  # the tiny stage 1 trained by the fixture
    cfg = stage_cfg("diffusion", [*DIFFUSION_TINY, f"model.vqgan_ckpt={vqgan_ckpt}"], out_dir, max_steps=2,
                    val_check_interval=2)
    lit = LitDiffusion(cfg)
    seen = []
    fit = lit._fit_scale_factor

    def recording_fit(loader):  # the latents of the batches the scale factor is computed from
        def batches():
            for batch in loader:
                z = batch["latent"].double()
                seen.append([float(z.numel()), float(z.sum()), float(z.square().sum())])
                yield batch
        return fit(batches())

    lit._fit_scale_factor = recording_fit
    datamodule = VolumeDataModule(cfg.dataset, cfg.train.run_dir)
    trainer = common.run_training(cfg, lit, datamodule)
    return {"step": trainer.global_step, "scale_factor": float(lit.model.scale_factor),
            "scale_stats": seen[: int(cfg.model.scale_factor_batches)],
            "latent_cache": type(datamodule.train_set).__name__,
            "weights": fingerprint(lit.model.unet.parameters()),
            "ema": fingerprint(lit.model.ema_unet.parameters())}


def test_stage2_scale_factor_pools_every_ranks_latents_and_is_identical(ddp_results):
    r0, r1 = (check(r["diffusion"]) for r in ddp_results["ranks"])
    assert r0["step"] == r1["step"] == 2
    assert r0["scale_factor"] == r1["scale_factor"]
    # 1/std of the latents both ranks encoded, pooled: not of one rank's alone.
    count, total, squares = np.sum(r0["scale_stats"] + r1["scale_stats"], axis=0)
    pooled = 1.0 / np.sqrt(squares / count - (total / count) ** 2)
    assert r0["scale_factor"] == pytest.approx(pooled, rel=1e-6)
    assert r0["scale_stats"] != r1["scale_stats"]  # the ranks drew different crops
    assert r0["latent_cache"] == r1["latent_cache"] == "LatentCropDataset"  # encoded once, by local rank zero
    assert r0["weights"] == r1["weights"] and r0["ema"] == r1["ema"]


# Stage-2 validation on 3 cases: 2 ranks (Lightning pads the cases to 4) must report what 1 process reports.

def diffusion_validation(out_dir, devices):
    from dataset.datamodule import VolumeDataModule
    from train import common
    from train.lit_diffusion import LitDiffusion

    tasks_dir = out_dir.parent if devices > 1 else out_dir.parent / "tasks"
    vqgan_ckpt = tasks_dir.parent / "single" / "last.ckpt"
    cfg = stage_cfg("diffusion", [*DIFFUSION_TINY, f"model.vqgan_ckpt={vqgan_ckpt}",
                                  "dataset.split.val_fraction=0.5"], out_dir, max_steps=1, devices=devices)
    lit = LitDiffusion(cfg)
    trainer = common.build_trainer(cfg, lit, out_dir)
    datamodule = VolumeDataModule(cfg.dataset, cfg.train.run_dir)
    trainer.validate(lit, datamodule=datamodule, ckpt_path=str(tasks_dir / "diffusion" / "last.ckpt"),
                     verbose=False)
    return {"val_loss": float(trainer.callback_metrics["val/loss"]), "n_val": len(datamodule.val_cases)}


def diffusion_validation_task(rank, out_dir):
    return diffusion_validation(out_dir, devices=2)


def test_stage2_validation_loss_does_not_depend_on_the_number_of_ranks(ddp_results):
    check(ddp_results["ranks"][0]["diffusion"])
    one = ddp_results["single_validation"]
    assert one["n_val"] == 3
    for two in (check(r["diffusion_validation"]) for r in ddp_results["ranks"]):
        assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Sampling: the tasks of a job split the label maps; each output is written once, as one process writes it.

def test_sampling_splits_label_maps_across_tasks_and_writes_each_output_once(ddp_results, demo_cfg, tmp_path,
                                                                          monkeypatch):
    from dataset.layout import find_cases
    from ddpm import sample

    check(ddp_results["ranks"][0]["diffusion"])
    labels = tmp_path / "labels"
    labels.mkdir()
    cases = find_cases(demo_cfg)[:3]
    for case in cases:
        (labels / f"{case.case_id}.nii.gz").symlink_to(case.label_path)
    stems = sorted(case.case_id for case in cases)

    def task(rank, out):
        """What task `rank` of a 2-task srun step runs (ddpm.sample reads its share from the Slurm variables)."""
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.setenv("SLURM_NTASKS", "2")
        cfg = compose("sample", [f"ckpt={ddp_results['dir'] / 'diffusion' / 'last.ckpt'}", f"labels={labels}",
                                 f"out={out}", "sampler=ddim", "steps=2", "device=cpu"])
        return sorted(path.name for path in sample.run(cfg))

    # Both tasks write into one folder, as in a job; each reports what it wrote.
    shares = [task(rank, tmp_path / "out") for rank in range(2)]
    # Sorted label maps dealt out in turn: task 0 takes the 1st and 3rd, task 1 the 2nd; none twice, none lost.
    assert shares == [[f"{stems[0]}_syn0.nii.gz", f"{stems[2]}_syn0.nii.gz"], [f"{stems[1]}_syn0.nii.gz"]]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == sorted(shares[0] + shares[1])


# --------------------------------------------------------------------------------------------------------------

SCENARIOS = {"vqgan_equivalence": vqgan_equivalence_task, "vqgan": vqgan_task, "diffusion": diffusion_task,
             "diffusion_validation": diffusion_validation_task}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, demo_cfg):
    out_dir = tmp_path_factory.mktemp("ddp")
    tasks_dir = out_dir / "tasks"
    # Stage-1 equivalence: one step from scratch initialises the codebook (rank 0's first batch under DDP, the
    # whole batch in one process: not comparable); both runs continue from that checkpoint for 3 steps.
    vqgan_equivalence_run(out_dir / "start", devices=1, batch_size=4, max_steps=1)
    single = vqgan_equivalence_run(out_dir / "single", devices=1, batch_size=4, max_steps=4,
                                   resume=str(out_dir / "start" / "last.ckpt"))
    ranks = run_tasks(SCENARIOS, 2, tasks_dir)
    single_validation = None
    if "error" not in ranks[0]["diffusion"]:
        single_validation = diffusion_validation(out_dir / "single_validation", devices=1)
    return {"dir": tasks_dir, "ranks": ranks, "single": single, "single_validation": single_validation}
