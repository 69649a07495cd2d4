"""Stage-2 model from `cfg.model` (config/model/diffusion.yaml): every key read by name."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ddpm.latent_diffusion import LatentDiffusion
from utils.errors import UserError
from vq_gan_3d.model import VQGAN


def unet_settings(model_cfg: DictConfig) -> dict[str, Any]:
    """UNet keyword arguments from `cfg.model`."""
    unet = model_cfg.unet
    return dict(
        decoder=str(model_cfg.decoder), block=str(unet.block), resnet_kernel=[int(k) for k in unet.resnet_kernel],
        base_channels=int(unet.base_channels),
        channel_mult=[int(m) for m in unet.channel_mult], num_res_blocks=int(unet.num_res_blocks),
        attention_levels=[int(a) for a in unet.attention_levels], head_channels=int(unet.head_channels),
        group_width=int(unet.group_width), expansion=int(unet.expansion), norm_groups=int(unet.norm_groups),
        dropout=float(unet.dropout), mask_channels=int(unet.mask_channels),
        mask_hidden_channels=int(unet.mask_hidden_channels), spade_hidden_channels=int(unet.spade_hidden_channels),
        spade_kernel_size=int(unet.spade_kernel_size), gradient_checkpointing=bool(unet.gradient_checkpointing))


def build_latent_diffusion(model_cfg: DictConfig, vqgan: VQGAN, label_nc: int) -> LatentDiffusion:
    m = model_cfg
    try:
        return LatentDiffusion(
            vqgan=vqgan, label_nc=int(label_nc), unet=unet_settings(m), timesteps=int(m.timesteps),
            beta_schedule=str(m.beta_schedule), prediction=str(m.prediction), loss=str(m.loss),
            cond_drop_prob=float(m.cond_drop_prob), ema_decay=float(m.ema_decay))
    except ValueError as err:
        raise UserError(f"model: {err}") from None
