"""The label-map generator as a thin LightningModule over `ddpm.label_generator.LabelGenerator`.

One run, two phases on whole label maps padded with background to `volume_shape`: for `model.autoencoder_steps`
steps the autoencoder learns to reconstruct the maps (cross-entropy + soft Dice); from then on it is frozen, every
training map is encoded once (the latent scale factor is set from these latents on a fresh run) and the UNet learns
to denoise the latents conditioned on the maps' lesion attributes until `trainer.max_steps`. One AdamW optimiser
holds both networks as two parameter groups: a step only moves the network whose loss it computed. The
autoencoder may train on random crops of the padded maps (`model.autoencoder_crop`, as stage 1 trains on crops of
the scans: it is convolutional, and the diffusion phase encodes whole maps). The attributes of every training and
validation map are measured at the start of fitting (`dataset.attributes`, on the model
grid); the training ones set the standardisation and are stored in the checkpoint, where sampling draws unset
attributes from them. `dataset.augment` reaches the autoencoder phase only (the diffusion phase reads the latents
of the unaugmented maps, and its batches carry only case ids: loading the maps it would not read cost about a
tenth of each step on a 2-core CPU).

At the switch the decoded training maps also set the generator's class offsets (`LabelGenerator.fit_class_bias`,
`model.generator.calibrate_classes`), which every later decoding applies.

Validation logs `val/ae_ce`, `val/ae_dice` (mean foreground Dice of the autoencoder's reconstruction, with the
class offsets once they are fitted) and
`val/loss`, the EMA UNet's denoising loss at fixed timesteps with per-case seeded noise; `val/loss` is +inf in the
autoencoder phase, so `best.ckpt` always holds a trained generator.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from dataset import cache
from dataset.attributes import lesion_classes, measure, voxel_volume_ml
from dataset.crops import LABEL_PAD_VALUE, pad_to_at_least
from dataset.validate import class_names
from ddpm.label_checkpoint import STAGE, checkpoint_metadata
from ddpm.label_generator import FEATURES_PER_CLASS, LabelGenerator, attribute_vector, foreground_box
from ddpm.samplers import SamplerSettings, gaussian
from evaluation.metrics import dice_per_class, mean_dice
from train.common import mean_over_unique_cases, save_image_grid
from train.lit_diffusion import VAL_TIMESTEP_QUANTILES, case_seed
from utils.build import build
from utils.checkpoint import dataset_settings
from utils.errors import UserError

log = logging.getLogger(__name__)
CALIBRATION_VALUES = 2**25  # most decoded logits kept to fit the class offsets (float32: 128 MiB)


def build_generator(cfg: DictConfig) -> tuple[LabelGenerator, dict[str, int]]:
    """The generator of `cfg.model.generator` for the data set's classes, and its lesion classes {name: index}."""
    lesions = lesion_classes(cfg.dataset)
    if not lesions:
        raise UserError(f"dataset.lesion_classes: the label-map generator conditions on lesion attributes; name "
                        f"the lesion classes of dataset={cfg.dataset.name}")
    model = build(cfg.model.generator, "model.generator", label_nc=int(cfg.dataset.label_nc),
                  n_attributes=FEATURES_PER_CLASS * len(lesions))
    return model, lesions


def autoencoder_crop(size, multiple) -> list[int] | None:
    """`model.autoencoder_crop`: None (whole maps) or three sizes divisible by the autoencoder's factor."""
    if size is None:
        return None
    crop = [int(s) for s in size]
    if len(crop) != 3 or any(c < 1 or c % int(f) for c, f in zip(crop, multiple)):
        raise UserError(f"model.autoencoder_crop={list(size)}: need three positive sizes divisible by "
                        f"{[int(f) for f in multiple]} (the autoencoder's down-sampling), or null for whole maps")
    return crop


def random_crops(label: torch.Tensor, size) -> torch.Tensor:
    """One crop of `size` per map of the batch (B, 1, X, Y, Z) at a uniformly drawn position (torch's global
    generator, seeded by the run); a side shorter than the crop is kept whole."""
    starts = [[int(torch.randint(0, max(n - c, 0) + 1, ())) for n, c in zip(label.shape[2:], size)]
              for _ in range(label.shape[0])]
    return torch.stack([label[i, :, x:x + size[0], y:y + size[1], z:z + size[2]]
                        for i, (x, y, z) in enumerate(starts)])


class LitLabels(pl.LightningModule):
    monitor = "val/loss"

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.model, self.lesions = build_generator(cfg)
        m = cfg.model
        self.autoencoder_steps = int(m.autoencoder_steps)
        if self.autoencoder_steps < 1:
            raise UserError(f"model.autoencoder_steps: need at least 1, got {self.autoencoder_steps}")
        self.autoencoder_lr, self.lr, self.weight_decay = float(m.autoencoder_lr), float(m.lr), float(m.weight_decay)
        self.autoencoder_crop = autoencoder_crop(m.autoencoder_crop, self.model.autoencoder.downsample)
        val = m.validation
        try:
            self.val_sampler = SamplerSettings(str(val.sampler), int(val.steps), 0.0)
        except ValueError as err:
            raise UserError(f"model.validation: {err}") from None
        self.val_guidance_scale = float(val.guidance_scale)
        self.val_volumes = int(val.n_volumes)
        self.dataset_info = dataset_settings(cfg.dataset)
        self.class_names = class_names(cfg.dataset)
        self.volume_shape: list[int] | None = None  # set by train.train_labels before fitting
        self.split: dict[str, list[str]] | None = None
        self.attribute_table: list[dict] = []
        self.vectors: dict[str, np.ndarray] = {}  # raw attribute vector per training and validation case
        self.positions: dict[str, torch.Tensor | None] = {}  # their spatial condition (model.spatial_condition)
        self._latents: dict[str, torch.Tensor] = {}
        self._diffusion_step = False

    @property
    def lesion_names(self) -> list[str]:
        return list(self.lesions)

    # set-up -------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = [{"params": list(self.model.autoencoder.parameters()), "lr": self.autoencoder_lr},
                  {"params": list(self.model.unet.parameters()), "lr": self.lr}]
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.split = datamodule.split
        train, val = datamodule.train_cases, datamodule.val_cases
        self.attribute_table, found, boxes = [], {}, {}
        for case in train + val:
            entry = cache.load_preprocessed(case, datamodule.cfg)
            label = np.asarray(entry.label)
            found[case.case_id] = measure(label, entry.grid_info.model_affine, self.lesions)
            self.vectors[case.case_id] = attribute_vector(found[case.case_id], self.lesion_names)
            # the body box on the padded grid the generator sees
            boxes[case.case_id] = foreground_box(pad_to_at_least(label, self.volume_shape, LABEL_PAD_VALUE)[0])
            if len(self.attribute_table) < len(train):
                self.attribute_table.append(found[case.case_id])
        if not torch.isfinite(self.model.attribute_mean).all():  # fresh run; a resumed one keeps its statistics
            self.model.fit_attributes(np.stack([self.vectors[c.case_id] for c in train]))
            self.model.fit_geometry(np.stack([boxes[c.case_id] for c in train]),
                                    voxel_volume_ml(cache.load_preprocessed(train[0], datamodule.cfg)
                                                    .grid_info.model_affine))
        for case_id in found:
            self.positions[case_id] = self.model.positions([found[case_id]], self.lesion_names,
                                                           boxes[case_id][None])

    def _attributes(self, case_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardised attribute vectors and spatial conditions (None without one) of `case_ids`."""
        vectors = self.model.standardise(np.stack([self.vectors[c] for c in case_ids])).to(self.device)
        if not self.model.n_spatial:
            return vectors, None
        return vectors, torch.cat([self.positions[c] for c in case_ids]).to(self.device)

    @torch.no_grad()
    def _encode_training_maps(self) -> None:
        """Encode every training map once (the autoencoder is frozen from now on); set the latent scale and (a
        fresh run) the class offsets from the decoded training maps, in float32 under any training precision, as the
        generator encodes and decodes when sampling."""
        with torch.autocast(self.device.type, enabled=False):
            datamodule = self.trainer.datamodule
            self.model.autoencoder.eval()
            padded = {}
            for case in datamodule.train_cases:
                label = np.asarray(cache.load_preprocessed(case, datamodule.cfg).label)
                padded[case.case_id] = torch.from_numpy(
                    pad_to_at_least(label, self.volume_shape, LABEL_PAD_VALUE)[0].astype(np.int16))
                latent = self.model.encode_unscaled(padded[case.case_id][None, None].to(self.device))
                self._latents[case.case_id] = latent[0].cpu()
            if not torch.isfinite(self.model.class_bias).all():  # a resumed run keeps its offsets
                decoded = ((self.model.autoencoder.decode(self._latents[c][None].to(self.device))[0], label)
                           for c, label in padded.items())
                errors = self.model.fit_class_bias(decoded, max_per_map=CALIBRATION_VALUES // (
                    len(padded) * self.model.label_nc), generator=torch.Generator().manual_seed(0))
                log.info("class offsets %s; decoded training volumes now off by %s",
                         ", ".join(f"{n} {b:+.3f}" for n, b in zip(self.class_names, self.model.class_bias.tolist())),
                         ", ".join(f"{n} {100 * e:+.2f} %" for n, e in zip(self.class_names, errors)))
            if not torch.isfinite(self.model.scale_factor):
                stacked = torch.stack(list(self._latents.values())).double()
                std = float(stacked.std())
                if not std > 0:
                    raise UserError("training label maps: their latents have zero variance (all maps identical?)")
                self.model.scale_factor.fill_(1.0 / std)
                log.info("latent scale factor %.5f (1/std of %d latent values)", 1.0 / std, stacked.numel())

    # training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        size = len(batch["case_id"])
        self._diffusion_step = self.global_step >= self.autoencoder_steps
        if not self._diffusion_step:
            label = batch["label"] if self.autoencoder_crop is None else random_crops(batch["label"],
                                                                                     self.autoencoder_crop)
            loss, stats = self.model.autoencoder_loss(label)
            self.log("train/ae_loss", loss, prog_bar=True, batch_size=size)
            self.log_dict({f"train/ae_{k}": v for k, v in stats.items()}, batch_size=size)
            return loss
        if not self._latents:
            self._encode_training_maps()
            self.trainer.datamodule.train_set.serve_ids_only()  # from now on the maps are read as latents
        latent = torch.stack([self._latents[c] for c in batch["case_id"]]).to(self.device) * self.model.scale_factor
        loss = self.model.diffusion_loss(latent, *self._attributes(batch["case_id"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._diffusion_step:
            self.model.update_ema(self.global_step - self.autoencoder_steps)

    # validation ---------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_metrics: dict[str, dict[str, float]] = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        label = batch["label"]
        model = self.model
        logits, _ = model.autoencoder(model.onehot(label))
        recon = model.classify(logits)
        ce = torch.nn.functional.cross_entropy(logits.float(), label[:, 0].long(), reduction="none").flatten(1).mean(1)
        fitted = model.is_fitted
        if fitted:
            latent = model.encode_unscaled(label) * model.scale_factor
            k = len(VAL_TIMESTEP_QUANTILES)
            t = torch.tensor([int(q * model.schedule.timesteps) for q in VAL_TIMESTEP_QUANTILES] * latent.shape[0],
                             device=latent.device)
            noise = torch.stack([gaussian((k, *latent.shape[1:]), generator=torch.Generator().manual_seed(case_seed(c)),
                                          device=latent.device) for c in batch["case_id"]]).flatten(0, 1)
            vectors, positions = self._attributes(batch["case_id"])
            errors = model.denoising_error(model.ema_unet, latent.repeat_interleave(k, 0),
                                           vectors.repeat_interleave(k, 0), t, noise, None,
                                           None if positions is None else positions.repeat_interleave(k, 0)
                                           ).view(-1, k).mean(1)
        for i, case_id in enumerate(batch["case_id"]):
            dice = mean_dice(dice_per_class(recon[i].cpu(), label[i, 0].cpu(), model.label_nc))
            self._val_metrics[case_id] = {"ae_ce": float(ce[i]), "ae_dice": dice,
                                          "loss": float(errors[i]) if fitted else math.inf}
        n_logged = batch_idx * int(label.shape[0])
        if fitted and n_logged < self.val_volumes and self.trainer.is_global_zero:
            self._log_samples(label[: self.val_volumes - n_logged], batch["case_id"], batch_idx)

    def on_validation_epoch_end(self) -> None:
        means = mean_over_unique_cases(self._val_metrics)  # every rank calls it (a collective)
        for name, value in means.items():
            self.log(f"val/{name}", value, prog_bar=name in ("loss", "ae_dice"))

    def _log_samples(self, label: torch.Tensor, case_ids, batch_idx: int) -> None:
        """Middle slices of validation maps and of maps generated from their attributes."""
        vectors, positions = self._attributes(case_ids[: label.shape[0]])
        generated = self.model.sample(vectors, label.shape[2:], settings=self.val_sampler, positions=positions,
                                      guidance_scale=self.val_guidance_scale,
                                      generator=torch.Generator().manual_seed(batch_idx))
        z = label.shape[-1] // 2
        rows = [[label[i, 0, :, :, z].float().cpu().numpy(), generated[i, :, :, z].float().cpu().numpy()]
                for i in range(label.shape[0])]
        save_image_grid(self, f"val/generated_{batch_idx}", rows)

    # checkpoints --------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stage"] = STAGE
        checkpoint[STAGE] = checkpoint_metadata(self.model, dataset=self.dataset_info, lesion_classes=self.lesions,
                                                attribute_table=self.attribute_table, volume_shape=self.volume_shape,
                                                split=self.split)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stored = (checkpoint.get(STAGE) or {}).get("volume_shape")
        if stored is not None and self.volume_shape is not None and list(stored) != list(self.volume_shape):
            raise UserError(f"train.resume: the checkpoint generates maps of {list(stored)} voxels, the data set now "
                            f"needs {list(self.volume_shape)} (model.volume_shape); start a new run")
