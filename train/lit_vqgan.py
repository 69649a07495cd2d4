"""Stage 1 as a thin LightningModule over `vq_gan_3d` (networks, losses and the two step functions live there).

Manual optimisation: one generator step (autoencoder) and, once the GAN is on, one discriminator step per batch
(`vq_gan_3d.training.training_iteration`). Lightning counts every `LightningOptimizer.step()` towards
`global_step`; the discriminator steps through the raw optimizer so that `global_step`, `trainer.max_steps`,
`gan_start_step` and checkpoint intervals all count iterations. The backward passes are plain `Tensor.backward`
calls, not `manual_backward`: under DDP the iteration averages its gradients itself (the DDP reducer would expect
every parameter in each of the two partial backward passes). Precision: 32-bit or bf16 autocast, which need no
loss scaling. Checkpoints carry `"stage": "vqgan"` and what `vq_gan_3d.checkpoint.load_vqgan` needs.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dataset.attributes import lesion_classes
from evaluation.metrics import gaussian_kernel_1d, psnr, ssim3d
from layers.memory_format import to_channels_last_3d
from train.common import lr_factor, mean_over_unique_cases, save_image_grid
from utils.build import build
from utils.checkpoint import dataset_settings
from utils.errors import UserError
from vq_gan_3d.checkpoint import STAGE, checkpoint_metadata
from vq_gan_3d.losses import lesion_l1
from vq_gan_3d.training import training_iteration


REFERENCE_BLUR_SIGMAS = (1.0, 2.0)


def gaussian_blur(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, X, Y, Z), edges replicated: the "blurred copy" reference that a
    reconstruction must beat."""
    radius = max(1, int(round(3 * sigma)))
    kernel = gaussian_kernel_1d(2 * radius + 1, sigma).to(volume)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        volume = F.conv3d(F.pad(volume, pad, mode="replicate"), kernel.view(1, 1, *shape))
    return volume


class LitVQGAN(pl.LightningModule):
    """Validation logs, on centre crops in the normalised range [-1, 1] (PSNR and SSIM with data range 2, hence
    the `_range2` in their names): `val/l1`, `val/psnr_range2`, `val/ssim_range2`, and the same two metrics of
    Gaussian-blurred copies of the input (`val/psnr_range2_blur1`, `..._blur2`: sigma 1 and 2 voxels) as
    references; over the crops that hold a lesion (`dataset.lesion_classes`), `val/lesion_l1` and `val/lesion_bias`
    (the mean signed error on lesion voxels: below 0, lesions come out darker); plus a PNG of middle slices (input,
    reconstruction, label) of `val_image_volumes` volumes."""

    monitor = "val/l1"

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.automatic_optimization = False
        m = cfg.model
        self.vqgan = build(m.vqgan, "model.vqgan")
        self.loss = build(m.loss, "model.loss")
        self.channels_last = bool(m.channels_last)
        if self.channels_last:
            to_channels_last_3d(self)
        self.lr, self.disc_lr = float(m.lr), float(m.disc_lr)
        self.betas = tuple(float(b) for b in m.betas)
        self.grad_clip = float(m.grad_clip)
        self.lr_decay_start = None if m.lr_decay_start is None else int(m.lr_decay_start)
        self.val_image_volumes = int(m.val_image_volumes)
        # the lesion voxels of model.loss.lesion_l1_weight's term: labels of dataset.lesion_classes
        self.register_buffer("lesion_labels", torch.tensor(sorted(lesion_classes(cfg.dataset).values()),
                                                           dtype=torch.long), persistent=False)
        self.seed = int(cfg.train.seed)
        self.dataset_info = dataset_settings(cfg.dataset)
        self.intensity_reference: dict | None = None
        self.split: dict[str, list[str]] | None = None  # the data module's, stored for stage 2 to reuse
        self._val_metrics: dict[str, dict[str, float]] = {}

    # set-up -------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.vqgan.parameters(), lr=self.lr, betas=self.betas)
        disc_params = [p for d in self.loss.discriminators() for p in d.parameters()]
        if not disc_params:
            return opt_g
        return [opt_g, torch.optim.Adam(disc_params, lr=self.disc_lr, betas=self.betas)]

    def on_fit_start(self) -> None:
        if str(self.trainer.precision).startswith("16"):
            raise UserError(f"trainer.precision: {self.trainer.precision} needs loss scaling, which stage 1 does not "
                            "do; use bf16-mixed (GPUs) or 32-true")
        datamodule = self.trainer.datamodule
        if self.intensity_reference is None and hasattr(datamodule, "reference_intensity_params"):
            self.intensity_reference = datamodule.reference_intensity_params()
        self.split = getattr(datamodule, "split", None)

    def _prepare(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        return image, label

    # training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        image, label = self._prepare(batch)
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        step = self.global_step
        self._set_learning_rates(step, [opt_g, opt_d])
        # Slice choices depend only on (seed, step, rank): identical after a resume, distinct across ranks.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + self.global_rank)
        logs = training_iteration(vqgan=self.vqgan, loss=self.loss, opt_g=opt_g,
                                  opt_d=opt_d.optimizer if opt_d is not None else None, image=image, label=label,
                                  step=step, generator=generator, grad_clip=self.grad_clip,
                                  lesion_mask=self._lesion_mask(label))
        batch_size = image.shape[0]
        shown = ("train/g_loss", "train/l1")
        self.log_dict({k: v for k, v in logs.items() if k not in shown}, batch_size=batch_size)
        self.log_dict({k: logs[k] for k in shown}, prog_bar=True, batch_size=batch_size)

    def _lesion_mask(self, label: torch.Tensor) -> torch.Tensor | None:
        if self.loss.lesion_l1_weight <= 0 or self.lesion_labels.numel() == 0:
            return None
        return torch.isin(label, self.lesion_labels)

    def _set_learning_rates(self, step: int, optimizers: list) -> None:
        factor = lr_factor(step, self.lr_decay_start, self.trainer.max_steps)
        for optimizer, base in zip(optimizers, (self.lr, self.disc_lr)):
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = base * factor
        self.log("train/lr_factor", factor)

    # validation ---------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_metrics = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image, label = self._prepare(batch)
        recon, _ = self.vqgan(image, label if self.vqgan.is_spade else None)
        recon = recon.float().clamp(-1, 1)
        # References a reconstruction should beat: Gaussian-blurred copies of the input (sigma in voxels), in
        # float32 under any training precision (under bf16 autocast the blur's convolution would run in bf16).
        with torch.autocast(image.device.type, enabled=False):
            blurred = {sigma: gaussian_blur(image.float(), sigma=sigma).cpu() for sigma in REFERENCE_BLUR_SIGMAS}
        for i, case_id in enumerate(batch["case_id"]):
            real, fake = image[i, 0].float().cpu(), recon[i, 0].cpu()
            metrics = {"l1": float(F.l1_loss(fake, real)), "psnr_range2": psnr(real, fake, data_range=2.0),
                       "ssim_range2": ssim3d(real, fake, data_range=2.0, low=-1.0)}
            lesion = torch.isin(label[i, 0].cpu(), self.lesion_labels.cpu())
            if lesion.any():  # crops holding a lesion: its error, and its signed mean (< 0: lesions come out darker)
                metrics["lesion_l1"] = float(lesion_l1(real, fake, lesion))
                metrics["lesion_bias"] = float((fake - real)[lesion].mean())
            for sigma, copy in blurred.items():
                metrics[f"psnr_range2_blur{sigma:g}"] = psnr(real, copy[i, 0], data_range=2.0)
                metrics[f"ssim_range2_blur{sigma:g}"] = ssim3d(real, copy[i, 0], data_range=2.0, low=-1.0)
            self._val_metrics[case_id] = metrics
        n_logged = batch_idx * int(image.shape[0])
        if n_logged < self.val_image_volumes:
            rows = []
            for i in range(min(image.shape[0], self.val_image_volumes - n_logged)):
                z = image.shape[-1] // 2
                rows.append([image[i, 0, :, :, z].float().cpu().numpy(), recon[i, 0, :, :, z].cpu().numpy(),
                             label[i, 0, :, :, z].float().cpu().numpy()])
            save_image_grid(self, f"val/reconstruction_{batch_idx}", rows)

    def on_validation_epoch_end(self) -> None:
        means = mean_over_unique_cases(self._val_metrics)
        for name, value in means.items():
            self.log(f"val/{name}", value, prog_bar=name in ("l1", "psnr_range2"))

    # checkpoints --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stage"] = STAGE
        checkpoint["vqgan"] = checkpoint_metadata(self.vqgan, dataset=self.dataset_info,
                                                  intensity_reference=self.intensity_reference, split=self.split)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = checkpoint.get("vqgan") or {}
        if stored.get("intensity_reference"):
            self.intensity_reference = dict(stored["intensity_reference"])


