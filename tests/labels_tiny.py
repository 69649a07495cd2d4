"""A tiny label-map generator and phantom label maps for the label-generator tests (CPU, milliseconds a step)."""
from __future__ import annotations

import numpy as np
import torch

from dataset.attributes import measure
from ddpm.label_generator import LabelGenerator, attribute_vector

LABEL_NC = 3
LESIONS = {"class_2": 2}  # class_names null: the data set's names are background, class_1, class_2
SHAPE = (16, 16, 12)
SPACING = (2.0, 2.0, 2.0)
TINY_AUTOENCODER = dict(quantizer="kl", base_channels=8, channel_mult=[1, 2], num_res_blocks=1, downsample=[2, 2, 2],
                        embedding_dim=4, norm_groups=4, kl_weight=1e-6, gradient_checkpointing=False)
TINY_UNET = dict(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], head_channels=16,
                 group_width=8, expansion=2, norm_groups=4, dropout=0.0, gradient_checkpointing=False)


def tiny_generator(seed: int = 0, **changes) -> LabelGenerator:
    torch.manual_seed(seed)
    settings = dict(label_nc=LABEL_NC, n_attributes=5 * len(LESIONS), autoencoder=TINY_AUTOENCODER, unet=TINY_UNET,
                    dice_weight=1.0, timesteps=50, beta_schedule="cosine", prediction="v", cond_drop_prob=0.2,
                    ema_decay=0.9)
    return LabelGenerator(**{**settings, **changes})


def phantom_map(lesion_radius: float, centre=(9.0, 8.0, 6.0)) -> np.ndarray:
    """An ellipsoidal body (class 1) holding a spherical lesion (class 2) of `lesion_radius` voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"))
    body = (((grid - np.array([7.5, 7.5, 5.5])[:, None, None, None]) / np.array([6.5, 6.0, 4.5])[:, None, None, None])
            ** 2).sum(0) <= 1
    lesion = ((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= lesion_radius**2
    label = np.zeros(SHAPE, np.int64)
    label[body] = 1
    label[body & lesion] = 2
    return label


def vectors_of(maps, affine) -> tuple[np.ndarray, list]:
    """Raw attribute vectors and measured attributes of label maps."""
    found = [measure(m, affine, LESIONS) for m in maps]
    return np.stack([attribute_vector(f, list(LESIONS)) for f in found]), found
