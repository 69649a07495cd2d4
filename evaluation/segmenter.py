"""The 3D segmenter used as a measuring instrument (mask fidelity, augmentation experiments): a MONAI UNet on the
model grid, trained on random crops with Dice + cross-entropy, a share of the crops centred on voxels of the rare
classes, validated every few steps on the validation cases and kept at its best validation score (early stop
after `patience` validations without improvement); sliding-window inference; saved as a file that `evaluate`
and `memorization` use as a feature extractor.

API (`evaluation.segmentation`, `evaluation.augmentation`):
- `Volume.from_arrays(case_id, image, label)`: one case on the model grid (image in [-1, 1], integer labels).
- `train_segmenter(train, val, cfg, seed, *, synthetic=(), synthetic_per_real=1.0, device=None) -> Segmenter`.
  `cfg` is a config holding `dataset` (label_nc, class_names, lesion_classes, crop_size) and `segmenter`
  (config/segmenter/default.yaml: network, train, validation, inference). `val` may be empty: then no
  validation, the last state is kept. With `synthetic`, a crop comes from a synthetic volume with probability
  synthetic_per_real / (1 + synthetic_per_real).
- `predict(model, image) -> label map` (int64, the image's shape): the argmax of the sliding-window logits, then
  predicted lesion components (26-connected) smaller than `model.min_lesion_voxels` go to the most likely
  non-lesion class. That size is chosen after training on the validation cases among
  `segmenter.inference.min_lesion_voxels` (the best validation score; ties: the smallest), as nnU-Net chooses
  its post-processing; a few stray voxels on a lesion-free scan otherwise score that scan's lesion Dice 0.
- `evaluate_dice(model, cases) -> {case_id: {class name: dice}}`: background excluded, the lesion classes first,
  NaN where a class is absent from both the prediction and the label map. `mean_per_class` averages it.
- `save_segmenter(model, path, *, dataset_cfg, overwrite, train_cases)`; `load_segmenter(path, cfg, device)` reads
  it back for the same data set (a file of another data set, grid or intensity map is a one-line error).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from omegaconf import OmegaConf

from dataset.attributes import components
from dataset.crops import IMAGE_PAD_VALUE, pad_to_at_least, sample_crop, unpad
from dataset.edit_labels import as_label_array
from dataset.geometry import to_model_grid
from dataset.intensity import build_normalizer
from dataset.io import load_nifti
from dataset.validate import class_names as dataset_class_names
from evaluation.features import (SEGMENTER_KIND, WeightsUnavailable, build_segmenter, load_segmenter_file,
                                 segmenter_network)
from evaluation.metrics import dice_per_class
from evaluation.segmenter_settings import Settings, settings_from
from layers.tiling import tiled_apply
from utils.atomic import atomic_path
from utils.errors import UserError


@dataclass
class Volume:
    """One image/label pair on the model grid (image in [-1, 1])."""

    name: str
    image: np.ndarray
    label: np.ndarray
    _voxels: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_arrays(cls, name: str, image: np.ndarray, label: np.ndarray) -> "Volume":
        return cls(name, np.array(image, dtype=np.float32), np.array(label, dtype=np.int64))

    def voxels(self, cls: int) -> np.ndarray:
        """(N, 3) coordinates of the voxels of class `cls` (computed once)."""
        if cls not in self._voxels:
            self._voxels[cls] = np.argwhere(self.label == cls).astype(np.int32)
        return self._voxels[cls]


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


def preprocess_pair(path: Path, label_path: Path, dataset_cfg) -> Volume:
    """A synthetic volume with its own label map file (an edited or a generated map), both on the same grid ->
    the model grid, the image normalised as the real images were."""
    raw, affine = load_nifti(label_path)
    label, _ = to_model_grid(as_label_array(raw, str(label_path)), affine, list(dataset_cfg.spacing), is_label=True)
    return preprocess_synthetic(path, label, raw.shape, dataset_cfg)


INFERENCE_TILES_PER_CALL = 8  # sliding-window tiles per network call: ~2x faster inference on a CPU than 1


def _lr_factor(settings: Settings):
    """Multiplier of the learning rate at a step: constant, or a cosine from 1 down to 0 at max_steps."""
    if settings.lr_schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, settings.max_steps) / settings.max_steps))


@dataclass
class Segmenter:
    """A trained network and what predicting and reporting with it needs."""

    net: torch.nn.Module
    settings: Settings
    device: torch.device
    steps: int = 0                                      # training steps run
    best_step: int | None = None                        # the step whose weights were kept (None: the last)
    history: list[dict] = field(default_factory=list)   # validations: step, score, Dice per class
    seconds: float = 0.0                                # training wall time, validations included
    train_cases: list[str] | None = None                # read back from a saved file (None: not recorded)
    min_lesion_voxels: int = 0                          # smaller predicted lesion components are removed
    postprocessing: dict = field(default_factory=dict)  # how min_lesion_voxels was chosen: validation scores


class CropSampler:
    """Training crops of one pool of volumes: with probability `class_crop_fraction` centred (up to a quarter of
    the crop off) on a random voxel of a class drawn uniformly among the `crop_classes` the pool holds, in a volume
    drawn among those holding that class; otherwise anywhere in a volume drawn uniformly."""

    def __init__(self, pool: Sequence[Volume], settings: Settings, generator: torch.Generator):
        self.pool, self.settings, self.generator = list(pool), settings, generator
        holders = {c: [v for v in self.pool if len(v.voxels(c))] for c in settings.crop_classes}
        self.holders = {c: volumes for c, volumes in holders.items() if volumes}
        self.classes = sorted(self.holders)
        self.reach = np.array([max(1, s // 4) for s in settings.crop_size])

    def _index(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.generator))

    def crop(self) -> tuple[np.ndarray, np.ndarray]:
        size = self.settings.crop_size
        if self.classes and float(torch.rand((), generator=self.generator)) < self.settings.class_crop_fraction:
            cls = self.classes[self._index(len(self.classes))]
            volume = self.holders[cls][self._index(len(self.holders[cls]))]
            voxels = volume.voxels(cls)
            jitter = np.array([self._index(2 * r + 1) - r for r in self.reach])
            centre = voxels[self._index(len(voxels))] + jitter
            return sample_crop(volume.image, volume.label, size, centre=centre, generator=self.generator)
        volume = self.pool[self._index(len(self.pool))]
        return sample_crop(volume.image, volume.label, size, generator=self.generator)


def _score(per_class: Mapping[str, float], settings: Settings) -> float:
    """lesion_weight x mean lesion Dice + (1 - lesion_weight) x mean foreground Dice (classes with a value)."""
    names = settings.class_names
    foreground = [v for v in per_class.values() if not math.isnan(v)]
    lesion = [per_class[names[c]] for c in settings.lesions if not math.isnan(per_class[names[c]])]
    if not foreground:
        return float("nan")
    mean = float(np.mean(foreground))
    return mean if not lesion else settings.lesion_weight * float(np.mean(lesion)) + (
        1.0 - settings.lesion_weight) * mean


def train_segmenter(train: Sequence[Volume], val: Sequence[Volume], cfg, seed: int, *,
                    synthetic: Sequence[Volume] = (), synthetic_per_real: float = 1.0,
                    device: torch.device | None = None) -> Segmenter:
    """Adam (constant or cosine-decayed learning rate) on Dice + cross-entropy over random crops, validated every `every_n_steps` steps on `val` (per-class
    Dice of whole volumes); returns the state with the best validation score, stopping after `patience`
    validations without a better one."""
    if not train:
        raise UserError("segmenter: no real training cases")
    settings = settings_from(cfg)
    device = torch.device("cpu") if device is None else device
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = build_segmenter(settings.network).to(device)
    model = Segmenter(net, settings, device)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(settings))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, lambda_dice=settings.dice_weight,
                         lambda_ce=settings.ce_weight)
    real_crops = CropSampler(train, settings, generator)
    synthetic_crops = CropSampler(synthetic, settings, generator) if synthetic else None
    share = synthetic_per_real / (1.0 + synthetic_per_real) if synthetic else 0.0
    best_score, best_state, waited = -math.inf, None, 0
    for step in range(1, settings.max_steps + 1):
        net.train()
        crops = [(synthetic_crops if float(torch.rand((), generator=generator)) < share else real_crops).crop()
                 for _ in range(settings.batch_size)]
        images = torch.from_numpy(np.stack([np.ascontiguousarray(c[0]) for c in crops]))[:, None].to(device)
        labels = torch.from_numpy(np.stack([np.ascontiguousarray(c[1]) for c in crops]))[:, None].to(device)
        loss = loss_fn(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        model.steps = step
        if not val or (step % settings.every_n_steps and step != settings.max_steps):
            continue
        per_class = mean_per_class(evaluate_dice(model, val))
        score = _score(per_class, settings)
        model.history.append({"step": step, "score": score, "dice": per_class,
                              "seconds": time.perf_counter() - started})
        if score > best_score:
            best_score, best_state, waited, model.best_step = score, copy.deepcopy(net.state_dict()), 0, step
        else:
            waited += 1
            if settings.patience is not None and waited >= settings.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    choose_min_lesion_voxels(model, val)
    model.seconds = time.perf_counter() - started
    return model


def choose_min_lesion_voxels(model: Segmenter, val: Sequence[Volume]) -> None:
    """Sets `model.min_lesion_voxels` to the candidate size with the best validation score (ties and NaN scores:
    the smallest; no validation cases or no lesion class: the smallest candidate) and records the scores."""
    settings = model.settings
    candidates = settings.min_lesion_candidates
    model.min_lesion_voxels = candidates[0]
    if not val or not settings.lesions or len(candidates) == 1:
        model.postprocessing = {"validation_scores": None}
        return
    per_size: dict[int, dict] = {size: {} for size in candidates}
    for case in val:  # one network pass per case, every candidate scored on its logits
        logits = sliding_logits(model, case.image)
        for size in candidates:
            per_size[size][case.name] = _named_dice(model, remove_small_lesions(logits, settings.lesions, size),
                                                    case.label)
    scores = {size: _score(mean_per_class(per_case), settings) for size, per_case in per_size.items()}
    valid = {size: score for size, score in scores.items() if not math.isnan(score)}
    if valid:
        top = max(valid.values())
        model.min_lesion_voxels = min(size for size, score in valid.items() if score == top)
    model.postprocessing = {"validation_scores": {str(k): v for k, v in scores.items()}}


@torch.no_grad()
def sliding_logits(model: Segmenter, image: np.ndarray) -> torch.Tensor:
    """Logits (classes, *image shape; CPU) of an image on the model grid: overlapping windows of the training crop
    size, blended as every tiled network call is (`layers.tiling`)."""
    model.net.eval()
    crop = list(model.settings.crop_size)
    padded, pads = pad_to_at_least(np.asarray(image, dtype=np.float32), crop, IMAGE_PAD_VALUE)
    x = torch.from_numpy(np.ascontiguousarray(padded))[None, None]
    logits = tiled_apply(model.net, x, window=crop, overlap=model.settings.overlap, device=model.device,
                         tiles_per_call=INFERENCE_TILES_PER_CALL)
    return unpad(logits[0], pads).float().cpu()


def remove_small_lesions(logits: torch.Tensor, lesions: Sequence[int], min_voxels: int) -> np.ndarray:
    """Argmax label map (int64) in which each lesion class's components (26-connected) of fewer than `min_voxels`
    voxels take the most likely non-lesion class instead."""
    labels = logits.argmax(dim=0).numpy()
    if min_voxels <= 1 or not lesions:
        return labels
    small = np.zeros(labels.shape, dtype=bool)
    for cls in lesions:
        labelled, count = components(labels == cls)
        if count:
            too_small = np.bincount(labelled.ravel()) < min_voxels
            too_small[0] = False
            small |= too_small[labelled]
    if small.any():
        others = logits[:, torch.from_numpy(small)].clone()
        others[list(lesions)] = -math.inf
        labels[small] = others.argmax(dim=0).numpy()
    return labels


def predict(model: Segmenter, image: np.ndarray) -> np.ndarray:
    """Label map (int64) of an image on the model grid (see the module text)."""
    return remove_small_lesions(sliding_logits(model, image), model.settings.lesions, model.min_lesion_voxels)


def _named_dice(model: Segmenter, prediction: np.ndarray, label: np.ndarray) -> dict[str, float]:
    names = model.settings.class_names
    dice = dice_per_class(prediction, label, len(names))
    return {names[c]: dice[c] for c in model.settings.report_order}


def evaluate_dice(model: Segmenter, cases: Sequence[Volume]) -> dict[str, dict[str, float]]:
    """{case: {class name: Dice}} for the foreground classes, the lesion classes first."""
    return {case.name: _named_dice(model, predict(model, case.image), case.label) for case in cases}


def mean_per_class(per_case: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{class name: mean Dice over the cases where it is defined (NaN where none)}, in the cases' class order."""
    classes = list(next(iter(per_case.values()))) if per_case else []
    means = {}
    for name in classes:
        values = [case[name] for case in per_case.values() if not math.isnan(case[name])]
        means[name] = float(np.mean(values)) if values else float("nan")
    return means


def save_segmenter(model: Segmenter, path: Path, *, dataset_cfg, overwrite: bool, train_cases: list[str]) -> Path:
    """Weights plus what is needed to rebuild the network and preprocess a volume as in training."""
    payload = {
        "kind": SEGMENTER_KIND,
        "network": model.settings.network,
        "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
        "spacing": [float(s) for s in dataset_cfg.spacing],
        "intensity": OmegaConf.to_container(dataset_cfg.intensity, resolve=True),
        "crop_size": list(model.settings.crop_size),
        "class_names": list(model.settings.class_names),
        "dataset": str(dataset_cfg.name),
        "n_train_cases": len(train_cases),
        "train_cases": list(train_cases),
        "steps": model.steps,
        "best_step": model.best_step,
        "min_lesion_voxels": model.min_lesion_voxels,
    }
    with atomic_path(path, overwrite) as tmp:
        torch.save(payload, tmp)
    return path


def load_segmenter(path, cfg, device: torch.device) -> Segmenter:
    """A segmenter saved by `save_segmenter`, for the data set of `cfg.dataset` (its name, classes, spacing and
    intensity map must match the file's); the inference settings come from `cfg.segmenter`."""
    try:
        saved = load_segmenter_file(path)
    except WeightsUnavailable as err:
        raise UserError(str(err)) from None
    dataset_cfg = cfg.dataset
    expected = {
        "dataset": str(dataset_cfg.name),
        "class_names": dataset_class_names(dataset_cfg),
        "spacing": [float(s) for s in dataset_cfg.spacing],
        "intensity": OmegaConf.to_container(dataset_cfg.intensity, resolve=True),
    }
    for key, value in expected.items():
        if saved.get(key) != value:
            raise UserError(f"{path}: segmenter trained with {key} {saved.get(key)!r}, this data set has {value!r}")
    settings = dataclasses.replace(settings_from(cfg), network=saved["network"],
                                   crop_size=[int(c) for c in saved["crop_size"]])
    try:
        net = segmenter_network(saved, path)
    except WeightsUnavailable as err:
        raise UserError(str(err)) from None
    size = int(saved.get("min_lesion_voxels", 0))  # files written before the post-processing existed: none
    return Segmenter(net.to(device).eval(), settings, device, steps=int(saved.get("steps", 0)),
                     best_step=saved.get("best_step"), train_cases=saved.get("train_cases"),
                     min_lesion_voxels=size, postprocessing={"chosen": "when the file was trained"})
