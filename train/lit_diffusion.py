"""Stage 2 as a thin LightningModule over `ddpm.latent_diffusion.LatentDiffusion`.

Before the first step of a fresh run, the latent scale factor is computed from `model.scale_factor_batches`
training batches (summed over DDP ranks); a resumed run keeps the one stored in its checkpoint. The EMA weights
follow every optimiser step and are the ones validated, sampled and shipped. Checkpoints carry
`"stage": "diffusion"` and everything `ddpm.checkpoint.load_diffusion` needs to sample without this config.
The stage-1 checkpoint must come from the same data (data set, modality, spacing, intensity map, label classes);
its patient split (`stage1_split`) is the one the data module reuses.
"""
from __future__ import annotations

import logging
import zlib

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from ddpm.checkpoint import STAGE, checkpoint_metadata
from ddpm.latent_cache import attach_latent_cache
from ddpm.latent_diffusion import LatentDiffusion, make_optimizer, per_sample_loss
from ddpm.samplers import SamplerSettings, gaussian
from train.common import lr_factor, mean_over_unique_cases, save_image_grid
from utils.build import build
from utils.checkpoint import dataset_settings
from utils.errors import UserError
from vq_gan_3d.checkpoint import load_vqgan_for_dataset

log = logging.getLogger(__name__)

VAL_TIMESTEP_QUANTILES = (0.1, 0.35, 0.6, 0.85)  # fixed timesteps (fractions of T) of the validation loss


def case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def build_model(cfg: DictConfig) -> tuple[LatentDiffusion, dict[str, list[str]] | None]:
    """The model on the stage-1 checkpoint (refused if trained on other data) and stage 1's patient split."""
    vqgan, split = load_vqgan_for_dataset(cfg.model.vqgan_ckpt, cfg.dataset, stage1_source(cfg))
    model = build(cfg.model.diffusion, "model.diffusion", vqgan=vqgan, label_nc=int(cfg.dataset.label_nc))
    try:
        model.check_image_size(cfg.dataset.crop_size)
    except ValueError as err:
        raise UserError(f"dataset.crop_size: {err}") from None
    return model, split


def stage1_source(cfg: DictConfig) -> str:
    return f"model.vqgan_ckpt={cfg.model.vqgan_ckpt}"


class LitDiffusion(pl.LightningModule):
    monitor = "val/loss"

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.model, self.stage1_split = build_model(cfg)  # the data module reuses stage 1's split
        self.lr = float(cfg.model.lr)
        self.lr_decay_start = None if cfg.model.lr_decay_start is None else int(cfg.model.lr_decay_start)
        self.weight_decay = float(cfg.model.weight_decay)
        self.scale_factor_batches = int(cfg.model.scale_factor_batches)
        self.use_latent_cache = bool(cfg.model.latent_cache)
        val = cfg.model.validation
        try:
            self.val_sampler = SamplerSettings(str(val.sampler), int(val.steps), float(val.eta))
        except ValueError as err:
            raise UserError(f"model.validation: {err}") from None
        if not 1 <= self.val_sampler.steps <= self.model.schedule.timesteps:
            raise UserError(f"model.validation.steps: must be between 1 and model.diffusion.timesteps "
                            f"({self.model.schedule.timesteps}), got {self.val_sampler.steps}")
        self.val_guidance_scale = float(val.guidance_scale)
        self.val_volumes = int(val.n_volumes)
        self.dataset_info = dataset_settings(cfg.dataset)
        self.intensity_reference: dict | None = None

    # set-up -------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return make_optimizer(self.model.unet, lr=self.lr, weight_decay=self.weight_decay)

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if self.intensity_reference is None and hasattr(datamodule, "reference_intensity_params"):
            self.intensity_reference = datamodule.reference_intensity_params()
        if self.use_latent_cache:  # training crops become latent crops (local rank zero encodes, the rest wait)
            attach_latent_cache(datamodule, self.model.vqgan, device=self.device, factor=self.model.vqgan.downsample,
                                build=self.trainer.local_rank == 0, barrier=self.trainer.strategy.barrier)
        if not self.model.has_scale_factor:  # fresh run; a resumed one restored its buffer already
            self._fit_scale_factor(datamodule.train_dataloader())

    @torch.no_grad()
    def _fit_scale_factor(self, loader) -> None:
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # count, sum, sum of squares
        for i, batch in enumerate(loader):
            if i >= self.scale_factor_batches:
                break
            z = (batch["latent"].to(self.device) if "latent" in batch
                 else self.model.encode_unscaled(batch["image"].to(self.device))).double()
            stats += torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64, device=self.device),
                                  z.sum(), z.square().sum()])
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        count, total, squares = stats.tolist()
        if count == 0:
            raise UserError("model.scale_factor_batches: no training batches to compute the latent scale factor from")
        scale = self.model.set_scale_factor_from(total / count, squares / count)
        if self.trainer.is_global_zero:
            log.info("latent scale factor %.5f (1/std of %d latent values)", scale, int(count))

    # training -----------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx) -> None:
        factor = lr_factor(self.global_step, self.lr_decay_start, self.trainer.max_steps)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = self.lr * factor
        self.log("train/lr_factor", factor)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "latent" in batch:  # from the latent cache
            loss = self.model.latent_training_loss(batch["latent"], batch["label"])
        else:
            loss = self.model.training_loss(batch["image"], batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model.update_ema(self.global_step)

    # validation ---------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_losses: dict[str, dict[str, float]] = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        x0 = self.model.encode(image)
        # Each case is noised at the same fixed timesteps with noise seeded by its id, so its loss depends neither
        # on the batch it lands in nor on the number of ranks, and successive validations compare weights only.
        k = len(VAL_TIMESTEP_QUANTILES)
        t = torch.tensor([int(q * self.model.schedule.timesteps) for q in VAL_TIMESTEP_QUANTILES] * x0.shape[0],
                         device=x0.device)
        noise = torch.stack([gaussian((k, *x0.shape[1:]), generator=torch.Generator().manual_seed(case_seed(c)),
                                      device=x0.device, dtype=x0.dtype) for c in batch["case_id"]]).flatten(0, 1)
        losses = per_sample_loss(self.model.ema_unet, self.model.schedule, x0.repeat_interleave(k, 0),
                                 label.repeat_interleave(k, 0), t, noise, loss=self.model.loss_kind)
        for case_id, case_losses in zip(batch["case_id"], losses.view(-1, k)):
            self._val_losses[case_id] = {"loss": float(case_losses.mean())}
        n_logged = batch_idx * int(image.shape[0])
        if n_logged < self.val_volumes and self.trainer.is_global_zero:
            self._log_samples(image[: self.val_volumes - n_logged], label[: self.val_volumes - n_logged],
                              batch_idx)

    def on_validation_epoch_end(self) -> None:
        means = mean_over_unique_cases(self._val_losses)  # every rank calls it (a collective)
        if "loss" in means:
            self.log("val/loss", means["loss"], prog_bar=True)

    def _log_samples(self, image: torch.Tensor, label: torch.Tensor, batch_idx: int) -> None:
        synthetic = self.model.synthesize(label, settings=self.val_sampler, guidance_scale=self.val_guidance_scale,
                                          generator=torch.Generator().manual_seed(batch_idx))
        rows = []
        for i in range(image.shape[0]):
            z = image.shape[-1] // 2
            rows.append([label[i, 0, :, :, z].float().cpu().numpy(), image[i, 0, :, :, z].float().cpu().numpy(),
                         synthetic[i, 0, :, :, z].float().cpu().numpy()])
        save_image_grid(self, f"val/samples_{batch_idx}", rows)

    # checkpoints --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stage"] = STAGE
        checkpoint["diffusion"] = checkpoint_metadata(self.model, dataset=self.dataset_info,
                                                      intensity_reference=self.intensity_reference)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get("diffusion") or {}
        if stored.get("intensity_reference"):
            self.intensity_reference = dict(stored["intensity_reference"])

