"""The label-map generator: new integer label maps of a data set's classes, conditioned on lesion attributes.

The same two stages as the image model, applied to label maps:
1. `autoencoder`: the stage-1 network (`vq_gan_3d.model.VQGAN`, normal decoder) on the one-hot map: `label_nc`
   input channels, `label_nc` logits out, a continuous (`kl`) or finite-scalar (`fsq`) latent. Loss: cross-entropy
   plus `dice_weight` x soft Dice (mean over classes) plus the latent kind's regulariser. Decoding takes the
   argmax after per-class offsets (`class_bias`, `fit_class_bias`) that keep the training maps' class volumes.
2. `unet` (`AttributeUNet`): the stage-2 `ddpm.unet.UNet3D` (decoder=normal, no SPADE) on that latent scaled to
   unit variance (`scale_factor`), conditioned on an attribute vector through an MLP whose output is added to the
   UNet's time embedding. Training replaces the vector by a learned null vector at `cond_drop_prob` per sample,
   so sampling can use classifier-free guidance. The normal decoder's concatenated condition channels carry the
   latent voxel coordinates: the generator works on whole volumes of one shape, where position is anatomy.
   With `spatial_condition`, one more channel per lesion class carries where its largest component should be: a
   Gaussian on the latent grid at the centroid, of the lesion's equivalent-sphere radius (at least one latent
   voxel), zero for an absent lesion and in the dropped (unconditional) rows. Training places it at each map's
   own centroid; sampling maps a requested normalised body centroid onto the grid through the training maps'
   mean body box (`body_box` buffer), as no generated body exists yet.

The attribute vector has, per lesion class (`dataset.attributes`, in the order of `lesion_classes`),
log1p(volume in mL), the component count and the centroid (r, a, s) of the largest component in normalised body
coordinates, each standardised with the training mean and standard deviation (`attribute_mean`/`attribute_std`
buffers, set once from the training maps); an absent lesion's centroid is the training mean (0 once
standardised). Generated maps sit on a RAS grid of the training spacing centred on the world origin
(`grid_affine`).

Its checkpoint (saving, loading, the metadata stored) is `ddpm.label_checkpoint`.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataset.attributes import LesionAttributes
from ddpm.class_offsets import fit_class_offsets
from ddpm.conditioning import Condition
from ddpm.latent_diffusion import ema_update
from ddpm.samplers import SamplerSettings, gaussian, guided, run_sampler
from ddpm.schedule import DiffusionSchedule
from ddpm.unet import UNet3D
from utils.build import configurable
from vq_gan_3d.model import VQGAN

LATENT_KINDS = ("kl", "fsq")
FEATURES_PER_CLASS = 5  # log1p(volume mL), count, centroid r, a, s
COORDINATE_CHANNELS = 3
POSITION_FEATURES = 4  # latent-grid index x, y, z of a lesion centroid and the spatial channel's sigma


# attributes as vectors ---------------------------------------------------------------------------------------
def attribute_vector(attributes: Mapping[str, LesionAttributes], lesion_names: Sequence[str]) -> np.ndarray:
    """Raw features (float64, FEATURES_PER_CLASS per lesion class); NaN centroid for an absent lesion."""
    values: list[float] = []
    for name in lesion_names:
        found = attributes[name]
        centroid = found.centroid if found.centroid is not None else (math.nan,) * 3
        values += [math.log1p(float(found.volume_ml)), float(found.count), *(float(c) for c in centroid)]
    return np.asarray(values, dtype=np.float64)


def grid_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of a generated map: voxel size `spacing`, the volume centred on the world origin."""
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1) / 2 * np.asarray(spacing, dtype=np.float64)
    return affine


def coordinate_grid(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """(1, 3, X, Y, Z) voxel-centre coordinates in [-1, 1] per axis."""
    axes = [torch.linspace(-1.0, 1.0, int(n), device=like.device, dtype=like.dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def foreground_box(label: np.ndarray) -> np.ndarray:
    """(2, 3) low and high voxel index of the non-background voxels (the body box of `dataset.attributes` in
    index space); NaN for an all-background map."""
    foreground = np.nonzero(np.asarray(label))
    if not foreground[0].size:
        return np.full((2, 3), np.nan)
    return np.array([[a.min() for a in foreground], [a.max() for a in foreground]], dtype=np.float64)


def lesion_positions(attributes: Sequence[Mapping[str, LesionAttributes]], lesion_names: Sequence[str],
                     boxes: np.ndarray, voxel_ml: float, downsample: Sequence[int]) -> np.ndarray:
    """(B, n_lesion_classes, POSITION_FEATURES): for each map's attributes and body box ((B, 2, 3) voxel
    indices of the generated grid), the latent-grid index of each lesion class's centroid and the sigma (latent
    voxels) of its spatial channel: the equivalent-sphere radius of its volume, at least 1. NaN rows where a
    class is absent (no centroid or no volume). Latent voxel j covers image voxels f*j .. f*j + f - 1."""
    factor = np.asarray(downsample, dtype=np.float64)
    out = np.full((len(attributes), len(lesion_names), POSITION_FEATURES), np.nan)
    for b, (found, box) in enumerate(zip(attributes, np.asarray(boxes, dtype=np.float64))):
        for k, name in enumerate(lesion_names):
            lesion = found[name]
            if lesion.centroid is None or not lesion.volume_ml > 0 or not np.isfinite(box).all():
                continue
            index = box[0] + np.asarray(lesion.centroid, dtype=np.float64) * (box[1] - box[0])
            radius = (3.0 * float(lesion.volume_ml) / float(voxel_ml) / (4.0 * math.pi)) ** (1.0 / 3.0)
            out[b, k, :3] = (index - (factor - 1) / 2) / factor
            out[b, k, 3] = max(1.0, radius / float(factor.mean()))
    return out


def spatial_channels(positions: torch.Tensor, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """(B, L, X, Y, Z) Gaussians exp(-d^2 / 2 sigma^2) on the latent grid of `shape` at `positions`
    (B, L, POSITION_FEATURES); zero for NaN rows (absent lesions)."""
    positions = positions.to(device=like.device, dtype=like.dtype)
    present = torch.isfinite(positions).all(-1)
    safe = torch.where(present[..., None], positions, torch.ones_like(positions))
    axes = [torch.arange(int(n), device=like.device, dtype=like.dtype) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (X, Y, Z, 3)
    distance = (grid[None, None] - safe[:, :, None, None, None, :3]).square().sum(-1)
    blobs = torch.exp(-distance / (2 * safe[..., 3, None, None, None].square()))
    return blobs * present[..., None, None, None].to(like.dtype)


def soft_dice_loss(logits: torch.Tensor, onehot: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax(logits) and the one-hot target, over the whole batch
    (a class absent from both scores 1 thanks to the smoothing `eps`)."""
    probs = logits.float().softmax(1)
    dims = (0, *range(2, logits.dim()))
    overlap = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * overlap + eps) / (total + eps)).mean()


# networks ----------------------------------------------------------------------------------------------------
class AttributeUNet(nn.Module):
    """`forward(x_t, t, attributes, drop=None, positions=None)`: `ddpm.unet.UNet3D` (normal decoder) with an
    attribute vector (B, n_attributes) embedded by an MLP and added to the time embedding (a forward hook on the
    UNet's `time_mlp`, so the UNet itself is unchanged); rows where `drop` is true use the learned null vector.
    With `n_spatial` > 0, `positions` (B, n_spatial, POSITION_FEATURES) add one Gaussian channel each to the
    coordinate channels (`spatial_channels`; zero in the dropped rows)."""

    def __init__(self, *, in_channels: int, n_attributes: int, unet: Mapping[str, Any], n_spatial: int = 0):
        super().__init__()
        # label_nc + 1 condition channels are concatenated to the input: the coordinate and spatial channels.
        self.n_spatial = int(n_spatial)
        self.unet = UNet3D(in_channels=in_channels, label_nc=COORDINATE_CHANNELS + self.n_spatial - 1,
                           decoder="normal", label_downsample=(1, 1, 1), **unet)
        width = self.unet.base_channels
        self.embed = nn.Sequential(nn.Linear(n_attributes, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.null_vector = nn.Parameter(torch.zeros(n_attributes))

    @property
    def required_multiple(self) -> int:
        return self.unet.required_multiple

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, attributes: torch.Tensor,
                drop: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        vector = attributes.to(x_t.dtype)
        if drop is not None:
            vector = torch.where(drop[:, None], self.null_vector.to(vector.dtype).expand_as(vector), vector)
        embedding = self.embed(vector)
        channels = coordinate_grid(x_t.shape[2:], x_t).expand(x_t.shape[0], -1, -1, -1, -1)
        if self.n_spatial:
            if positions is None or tuple(positions.shape[1:]) != (self.n_spatial, POSITION_FEATURES):
                raise ValueError(f"positions: need (B, {self.n_spatial}, {POSITION_FEATURES}), got "
                                 f"{None if positions is None else tuple(positions.shape)}")
            spatial = spatial_channels(positions, x_t.shape[2:], x_t)
            if drop is not None:
                spatial = spatial * (~drop).to(spatial.dtype)[:, None, None, None, None]
            channels = torch.cat([channels, spatial], 1)
        hook = self.unet.time_mlp.register_forward_hook(lambda _module, _inputs, temb: temb + embedding)
        try:
            return self.unet(x_t, t, Condition(levels=[channels]))
        finally:
            hook.remove()


@configurable()
class LabelGenerator(nn.Module):
    """Built from `model.generator` (`utils.build.build`, config/model/labels.yaml) with `label_nc` and
    `n_attributes` from the data set. `autoencoder` holds the `VQGAN` arguments other than the channels (fixed by
    `label_nc`); `unet` the `UNet3D` arguments other than the decoder, channels and classes."""

    def __init__(self, *, label_nc: int, n_attributes: int, autoencoder: Mapping[str, Any],
                 unet: Mapping[str, Any], dice_weight: float, timesteps: int, beta_schedule: str, prediction: str,
                 cond_drop_prob: float, ema_decay: float, spatial_condition: bool = False,
                 calibrate_classes: bool = True):
        super().__init__()
        kind = str(autoencoder.get("quantizer", "kl"))
        if kind not in LATENT_KINDS:
            raise ValueError(f"autoencoder.quantizer must be one of {list(LATENT_KINDS)}, got {kind!r}")
        if n_attributes < 1:
            raise ValueError("the generator needs at least one lesion class to condition on "
                             "(set dataset.lesion_classes)")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
        self.label_nc = int(label_nc)
        self.n_attributes = int(n_attributes)
        self.autoencoder = VQGAN(in_channels=self.label_nc, label_nc=None, **autoencoder)
        self.n_spatial = self.n_attributes // FEATURES_PER_CLASS if spatial_condition else 0
        self.unet = AttributeUNet(in_channels=self.autoencoder.embedding_dim, n_attributes=self.n_attributes,
                                  unet=unet, n_spatial=self.n_spatial)
        self.ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.schedule = DiffusionSchedule(timesteps=timesteps, beta_schedule=beta_schedule, prediction=prediction)
        self.dice_weight = float(dice_weight)
        self.cond_drop_prob = float(cond_drop_prob)
        self.ema_decay = float(ema_decay)
        self.calibrate_classes = bool(calibrate_classes)
        self.register_buffer("scale_factor", torch.tensor(float("nan")))
        # per-class offsets added to the decoded logits before the argmax (`fit_class_bias`); NaN until fitted
        self.register_buffer("class_bias", torch.full((self.label_nc,), float("nan")))
        self.register_buffer("attribute_mean", torch.full((self.n_attributes,), float("nan")))
        self.register_buffer("attribute_std", torch.full((self.n_attributes,), float("nan")))
        if self.n_spatial:  # the training maps' mean body box (voxel indices of the padded grid), the voxel volume
            self.register_buffer("body_box", torch.full((2, 3), float("nan"), dtype=torch.float64))
            self.register_buffer("voxel_ml", torch.tensor(float("nan"), dtype=torch.float64))

    def train(self, mode: bool = True) -> "LabelGenerator":
        super().train(mode)
        self.ema_unet.eval()
        return self

    @property
    def image_multiple(self) -> tuple[int, int, int]:
        """Every side of a generated map is divisible by this (autoencoder factor x UNet levels)."""
        return tuple(int(f) * self.unet.required_multiple for f in self.autoencoder.downsample)

    @property
    def is_fitted(self) -> bool:
        """The latent scale, the class offsets, the attribute standardisation and (spatial condition) the body box
        are set (the diffusion phase has started)."""
        fitted = bool(torch.isfinite(self.scale_factor)) and bool(torch.isfinite(self.attribute_mean).all())
        fitted = fitted and bool(torch.isfinite(self.class_bias).all())
        return fitted and (not self.n_spatial or bool(torch.isfinite(self.body_box).all()))

    # attributes --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_attributes(self, vectors: np.ndarray) -> None:
        """Training mean and std of the raw attribute vectors (N, n_attributes), NaNs (absent centroids)
        left out; a feature that never varies keeps std 1, one never measured mean 0."""
        vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, self.n_attributes)
        present = np.isfinite(vectors)
        counts = present.sum(0)
        filled = np.where(present, vectors, 0.0)
        mean = np.divide(filled.sum(0), counts, out=np.zeros(self.n_attributes), where=counts > 0)
        spread = np.where(present, vectors - mean, 0.0)
        std = np.sqrt(np.divide((spread**2).sum(0), counts, out=np.zeros(self.n_attributes), where=counts > 0))
        self.attribute_mean.copy_(torch.from_numpy(mean))
        self.attribute_std.copy_(torch.from_numpy(np.where(std > 1e-8, std, 1.0)))

    @torch.no_grad()
    def fit_geometry(self, boxes: np.ndarray, voxel_ml: float) -> None:
        """Spatial condition: the mean of the training maps' body boxes (N, 2, 3) and the voxel volume in mL."""
        if self.n_spatial:
            self.body_box.copy_(torch.from_numpy(np.nanmean(np.asarray(boxes, dtype=np.float64), axis=0)))
            self.voxel_ml.fill_(float(voxel_ml))

    def positions(self, attributes: Sequence[Mapping[str, LesionAttributes]], lesion_names: Sequence[str],
                  boxes: np.ndarray | None = None) -> torch.Tensor | None:
        """The spatial condition (B, n_spatial, POSITION_FEATURES) of raw attributes, through each map's own body
        box (training) or the fitted mean box (sampling); None without a spatial condition."""
        if not self.n_spatial:
            return None
        if boxes is None:
            boxes = np.repeat(self.body_box.cpu().numpy()[None], len(attributes), axis=0)
        found = lesion_positions(attributes, lesion_names, boxes, float(self.voxel_ml), self.autoencoder.downsample)
        return torch.from_numpy(found.astype(np.float32)).to(self.scale_factor.device)

    def standardise(self, vectors: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw attribute vectors (B, n_attributes) -> the network's input (NaN -> 0, the training mean)."""
        raw = torch.as_tensor(np.asarray(vectors, dtype=np.float32)).to(self.attribute_mean.device)
        standard = (raw - self.attribute_mean) / self.attribute_std
        return torch.nan_to_num(standard, nan=0.0)

    # autoencoder -------------------------------------------------------------------------------------------
    def onehot(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) or (B, X, Y, Z) ints -> (B, label_nc, X, Y, Z) float."""
        if label.dim() == 5:
            label = label[:, 0]
        return F.one_hot(label.long(), self.label_nc).movedim(-1, 1).float()

    def autoencoder_loss(self, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy + dice_weight x soft Dice + the latent regulariser of one batch of label maps."""
        onehot = self.onehot(label)
        logits, info = self.autoencoder(onehot)
        target = onehot.argmax(1)
        ce = F.cross_entropy(logits.float(), target)
        dice = soft_dice_loss(logits, onehot)
        regularizer = sum(info["regularizer"].values(), torch.zeros((), device=ce.device))
        total = ce + self.dice_weight * dice + regularizer
        with torch.no_grad():
            accuracy = (logits.argmax(1) == target).float().mean()
        return total, {"ce": ce.detach(), "soft_dice_loss": dice.detach(), "accuracy": accuracy,
                       **{k: v.detach() for k, v in info["stats"].items()}}

    @torch.no_grad()
    def encode_unscaled(self, label: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(self.onehot(label)).float()

    def classify(self, logits: torch.Tensor) -> torch.Tensor:
        """Decoded logits (B, label_nc, ...) -> integer labels: the argmax after the fitted class offsets (none
        before `fit_class_bias`)."""
        if not bool(torch.isfinite(self.class_bias).all()):
            return logits.argmax(1)
        return (logits.float() + self.class_bias.view(1, -1, *[1] * (logits.dim() - 2))).argmax(1)

    @torch.no_grad()
    def fit_class_bias(self, maps: Iterable[tuple[torch.Tensor, torch.Tensor]], *, iterations: int = 60,
                       max_per_map: int | None = None, generator: torch.Generator | None = None) -> np.ndarray:
        """Set `class_bias` from the decoded training maps (`ddpm.class_offsets.fit_class_offsets`: `maps` yields
        (logits (label_nc, ...), label (...)) one map at a time) so that their argmax keeps each class's training
        volume; zeros with `calibrate_classes=false`. Returns the relative volume error per class after the fit."""
        bias, errors = fit_class_offsets(maps, self.label_nc, iterations=iterations if self.calibrate_classes else 0,
                                         max_per_map=max_per_map, generator=generator)
        self.class_bias.copy_(bias.to(self.class_bias))
        return errors

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> integer label maps (B, X, Y, Z) (`classify` of the logits)."""
        return self.classify(self.autoencoder.decode(latent / self.scale_factor))

    # diffusion ---------------------------------------------------------------------------------------------
    def diffusion_loss(self, latent: torch.Tensor, attributes: torch.Tensor, positions: torch.Tensor | None = None,
                       *, generator: torch.Generator | None = None) -> torch.Tensor:
        """L2 denoising loss on scaled latents at uniform timesteps; attributes (standardised) dropped to the
        null vector at `cond_drop_prob` per sample."""
        source = generator.device if generator is not None else latent.device
        batch = latent.shape[0]
        t = torch.randint(0, self.schedule.timesteps, (batch,), generator=generator, device=source).to(latent.device)
        drop = (torch.rand(batch, generator=generator, device=source) < self.cond_drop_prob).to(latent.device)
        noise = gaussian(latent.shape, generator=generator, device=latent.device)
        return self.denoising_error(self.unet, latent, attributes, t, noise, drop, positions).mean()

    def denoising_error(self, unet: AttributeUNet, latent, attributes, t, noise, drop=None,
                        positions=None) -> torch.Tensor:
        """(B,) mean squared error of `unet`'s prediction of the schedule's target."""
        x_t = self.schedule.q_sample(latent, t, noise)
        prediction = unet(x_t, t, attributes, drop, positions).float()
        return (prediction - self.schedule.training_target(latent, noise, t).float()).square().flatten(1).mean(1)

    def update_ema(self, step: int) -> None:
        ema_update(self.ema_unet, self.unet, self.ema_decay, step)

    @torch.no_grad()
    def sample(self, attributes: torch.Tensor, shape: Sequence[int], *, settings: SamplerSettings,
               positions: torch.Tensor | None = None, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Standardised attributes (B, n_attributes) (and with a spatial condition their `positions`) -> integer
        label maps (B, X, Y, Z) of `shape`."""
        if not self.is_fitted:
            raise RuntimeError("the generator was never fitted (no latent scale or attribute statistics)")
        if any(int(s) % m for s, m in zip(shape, self.image_multiple)):
            raise ValueError(f"shape {list(shape)} must be divisible by {list(self.image_multiple)}")
        attributes = attributes.to(self.scale_factor.device)
        batch = attributes.shape[0]
        latent_shape = (batch, self.autoencoder.embedding_dim,
                        *(int(s) // int(f) for s, f in zip(shape, self.autoencoder.downsample)))
        unet = self.ema_unet
        if guidance_scale == 1.0:
            def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
                return unet(x_t, torch.full((batch,), t, device=x_t.device), attributes,
                            positions=positions).float()
        else:
            both = torch.cat([attributes, attributes])
            both_positions = None if positions is None else torch.cat([positions, positions])
            drop = torch.arange(2 * batch, device=both.device) >= batch

            def pair(x_t: torch.Tensor, t: int) -> torch.Tensor:
                return unet(x_t, torch.full((2 * batch,), t, device=x_t.device), both, drop,
                            both_positions).float()

            denoise = guided(pair, guidance_scale)
        noise = gaussian(latent_shape, generator=generator, device=self.scale_factor.device)
        latent = run_sampler(settings, denoise, noise, self.schedule, generator=generator)
        return self.decode(latent)
