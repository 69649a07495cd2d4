"""A small 3D segmenter (MONAI UNet) for mask fidelity and augmentation experiments: volumes on the model grid,
training on random crops, sliding-window inference, saving/loading as a file that `evaluate` can use as a
feature extractor."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from omegaconf import OmegaConf

from dataset.crops import sample_crop
from dataset.geometry import to_model_grid
from dataset.intensity import build_normalizer
from dataset.io import load_nifti
from evaluation.features import SEGMENTER_KIND, build_segmenter
from evaluation.metrics import dice_per_class
from utils.atomic import atomic_path
from utils.errors import UserError


@dataclass
class Volume:
    """One image/label pair on the model grid (image in [-1, 1])."""

    name: str
    image: np.ndarray
    label: np.ndarray
    foreground: np.ndarray  # (N, 3) voxel coordinates with label > 0

    @classmethod
    def from_arrays(cls, name: str, image: np.ndarray, label: np.ndarray) -> "Volume":
        label = np.array(label, dtype=np.int64)
        return cls(name, np.array(image, dtype=np.float32), label, np.argwhere(label > 0).astype(np.int32))


def preprocess_synthetic(path: Path, source_label: np.ndarray, original_shape: Sequence[int], dataset_cfg) -> Volume:
    """A synthetic volume in native units on the original grid of its label map -> the model grid, normalised
    exactly as the real images were; paired with the (already preprocessed) label map of its source case."""
    array, affine = load_nifti(path)
    if tuple(array.shape) != tuple(original_shape):
        raise UserError(f"{path}: shape {tuple(array.shape)} differs from its label map {tuple(original_shape)}; "
                        "synthetic volumes must be on the label map's grid")
    grid, _ = to_model_grid(array.astype(np.float32), affine, list(dataset_cfg.spacing), is_label=False)
    normalised, _ = build_normalizer(dataset_cfg.intensity).forward(grid)
    if normalised.shape != source_label.shape:
        raise UserError(f"{path}: on the model grid its shape {normalised.shape} differs from its label map "
                        f"{source_label.shape}; check the affine")
    return Volume.from_arrays(path.name, normalised, source_label)


def network_settings(segmenter_cfg, label_nc: int) -> dict:
    return {"label_nc": int(label_nc), "channels": [int(c) for c in segmenter_cfg.channels],
            "strides": [int(s) for s in segmenter_cfg.strides], "num_res_units": int(segmenter_cfg.num_res_units),
            "dropout": float(segmenter_cfg.dropout)}


def _batch(volumes: list[Volume], picks: list[int], crop_size, foreground_prob: float, generator) -> tuple:
    images, labels = [], []
    for index in picks:
        v = volumes[index]
        image, label = sample_crop(v.image, v.label, crop_size, foreground=v.foreground,
                                   foreground_prob=foreground_prob, generator=generator)
        images.append(torch.from_numpy(np.ascontiguousarray(image)))
        labels.append(torch.from_numpy(np.ascontiguousarray(label)))
    return torch.stack(images)[:, None], torch.stack(labels)[:, None]


def train_segmenter(real: list[Volume], synthetic: list[Volume], *, network: dict, steps: int, batch_size: int,
                    lr: float, crop_size: Sequence[int], foreground_prob: float, synthetic_per_real: float,
                    seed: int, device: torch.device) -> torch.nn.Module:
    """Adam on Dice + cross-entropy over random crops. With `synthetic`, each crop comes from a synthetic volume
    with probability synthetic_per_real / (1 + synthetic_per_real)."""
    if not real:
        raise UserError("segmentation: no real training cases in the split")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = build_segmenter(network).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    share = synthetic_per_real / (1.0 + synthetic_per_real) if synthetic else 0.0
    net.train()
    for _ in range(steps):
        images, labels = [], []
        for _ in range(batch_size):
            pool = synthetic if float(torch.rand((), generator=generator)) < share else real
            pick = int(torch.randint(0, len(pool), (1,), generator=generator))
            image, label = _batch(pool, [pick], crop_size, foreground_prob, generator)
            images.append(image)
            labels.append(label)
        loss = loss_fn(net(torch.cat(images).to(device)), torch.cat(labels).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def predict(net: torch.nn.Module, image: np.ndarray, *, crop_size: Sequence[int], overlap: float,
            device: torch.device) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    logits = sliding_window_inference(x, roi_size=list(crop_size), sw_batch_size=2, predictor=net,
                                      overlap=overlap, mode="gaussian", padding_mode="constant", cval=-1.0)
    return logits.argmax(dim=1)[0].cpu().numpy()


def dice_on(net, volumes: list[Volume], *, label_nc: int, crop_size, overlap: float, device) -> list[dict]:
    """Per volume: {"name", "dice": {class: value}} with background excluded."""
    return [{"name": v.name, "dice": dice_per_class(predict(net, v.image, crop_size=crop_size, overlap=overlap,
                                                            device=device), v.label, label_nc)}
            for v in volumes]


def save_segmenter(net: torch.nn.Module, path: Path, *, network: dict, dataset_cfg, crop_size, overwrite: bool,
                   train_cases: list[str]) -> Path:
    """Weights plus what is needed to rebuild the network and preprocess a volume as in training."""
    payload = {
        "kind": SEGMENTER_KIND,
        "network": network,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "spacing": [float(s) for s in dataset_cfg.spacing],
        "intensity": OmegaConf.to_container(dataset_cfg.intensity, resolve=True),
        "crop_size": [int(c) for c in crop_size],
        "dataset": str(dataset_cfg.name),
        "n_train_cases": len(train_cases),
    }
    with atomic_path(path, overwrite) as tmp:
        torch.save(payload, tmp)
    return path
