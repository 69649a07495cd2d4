"""Stage-1 networks and losses from `cfg.model` (config/model/vqgan.yaml; the latent kind is
`model.quantizer=ema_vq|fsq|kl`, each kind reading its own keys): every key read by name."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from utils.errors import UserError
from vq_gan_3d.losses import VQGANLoss
from vq_gan_3d.model import KINDS, VQGAN


def build_vqgan(model_cfg: DictConfig, label_nc: int) -> VQGAN:
    m = model_cfg
    if m.decoder not in ("normal", "spade"):
        raise UserError(f"model.decoder: must be normal or spade, got {m.decoder!r}")
    blocks = m.num_res_blocks
    try:
        return _vqgan(m, blocks, label_nc)
    except ValueError as err:  # inconsistent shapes, e.g. channel_mult vs downsample
        raise UserError(f"model: {err}") from None


def quantizer_settings(m: DictConfig) -> dict[str, Any]:
    """The latent kind and its settings, as VQGAN keyword arguments."""
    kind = str(m.quantizer)
    if kind not in KINDS:
        raise UserError(f"model.quantizer: must be one of {list(KINDS)}, got {kind!r}")
    if kind == "fsq":
        return dict(quantizer=kind, fsq_levels=[int(level) for level in m.fsq_levels],
                    usage_window=int(m.usage_window))
    if kind == "kl":
        return dict(quantizer=kind, embedding_dim=int(m.embedding_dim), kl_weight=float(m.kl_weight))
    return dict(quantizer=kind, embedding_dim=int(m.embedding_dim), num_codes=int(m.num_codes),
                ema_decay=float(m.ema_decay), commitment_weight=float(m.commitment_weight),
                dead_code_threshold=float(m.dead_code_threshold), usage_window=int(m.usage_window))


def _vqgan(m: DictConfig, blocks, label_nc: int) -> VQGAN:
    return VQGAN(
        base_channels=int(m.base_channels), channel_mult=[int(c) for c in m.channel_mult],
        num_res_blocks=int(blocks) if isinstance(blocks, int) else [int(b) for b in blocks],
        downsample=[int(f) for f in m.downsample], **quantizer_settings(m), norm_groups=int(m.norm_groups),
        label_nc=int(label_nc) if m.decoder == "spade" else None,
        spade_hidden=int(m.spade_hidden), mask_compressor_channels=int(m.mask_compressor_channels),
        mask_compressor_hidden=int(m.mask_compressor_hidden), gradient_checkpointing=bool(m.gradient_checkpointing))


def build_loss(model_cfg: DictConfig) -> VQGANLoss:
    m = model_cfg
    return VQGANLoss(
        l1_weight=float(m.l1_weight), perceptual_weight=float(m.perceptual_weight),
        perceptual_backbone=str(m.perceptual_backbone),
        perceptual_path=str(m.perceptual_path) if m.perceptual_path else None,
        n_slices=int(m.slices_per_volume), gan_start_step=int(m.gan_start_step),
        gan_weight_2d=float(m.gan_weight_2d), gan_weight_3d=float(m.gan_weight_3d),
        feature_matching_weight=float(m.feature_matching_weight), disc_channels=int(m.disc_channels),
        disc_layers=int(m.disc_layers))
