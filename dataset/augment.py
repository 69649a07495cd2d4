"""Training augmentations (TorchIO), built from `cfg.dataset.augment`.

- `flip_axes`: axes (0 = X/left-right, 1 = Y, 2 = Z) flipped with probability 0.5 each; empty by default, since
  a left-right flip breaks anatomy.
- `affine_prob`, `rotation_deg`, `scale_range`: a random rotation (degrees, each axis) and scaling (1 +- range)
  in millimetres on the crop, with the given probability.
- `gamma_prob`: a random gamma curve (log gamma in +-0.3) on the [-1, 1] intensities, keeping -1 and 1 fixed.
Labels stay integer: TorchIO returns label maps as float, so they are rounded back.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torchio as tio

from dataset.crops import IMAGE_PAD_VALUE, LABEL_PAD_VALUE
from dataset.validate import check_augment

LOG_GAMMA_RANGE = 0.3


def _random_gamma(tensor: torch.Tensor) -> torch.Tensor:
    gamma = float(torch.empty(()).uniform_(-LOG_GAMMA_RANGE, LOG_GAMMA_RANGE).exp())
    unit = ((tensor + 1.0) / 2.0).clamp(0.0, 1.0)
    return unit.pow(gamma) * 2.0 - 1.0


def build_augmentation(augment_cfg: Mapping, spacing: Sequence[float]):
    """A callable `(image, label) -> (image, label)` on (X, Y, Z) float32/int64 tensors, or None if all off."""
    check_augment(augment_cfg)
    flip_axes = [int(a) for a in augment_cfg["flip_axes"]]
    affine_prob, gamma_prob = float(augment_cfg["affine_prob"]), float(augment_cfg["gamma_prob"])
    transforms = []
    if flip_axes:
        transforms.append(tio.RandomFlip(axes=tuple(flip_axes), flip_probability=0.5))
    if affine_prob > 0:
        transforms.append(tio.RandomAffine(
            scales=float(augment_cfg["scale_range"]), degrees=float(augment_cfg["rotation_deg"]),
            default_pad_value=IMAGE_PAD_VALUE, default_pad_label=LABEL_PAD_VALUE,
            image_interpolation="linear", label_interpolation="nearest", p=affine_prob))
    if gamma_prob > 0:
        transforms.append(tio.Lambda(_random_gamma, types_to_apply=[tio.INTENSITY], p=gamma_prob))
    if not transforms:
        return None
    pipeline = tio.Compose(transforms)
    affine = np.diag([*map(float, spacing), 1.0])

    def apply(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        subject = tio.Subject(image=tio.ScalarImage(tensor=image[None].float(), affine=affine),
                              label=tio.LabelMap(tensor=label[None], affine=affine))
        out = pipeline(subject)
        return out["image"].data[0].float().contiguous(), out["label"].data[0].round().long().contiguous()

    return apply
