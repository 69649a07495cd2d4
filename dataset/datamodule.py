"""`VolumeDataModule`: checked, split, preprocessed volumes as batches of crops.

Batches are dicts `{"image": float (B, 1, X, Y, Z) in [-1, 1], "label": long (B, 1, X, Y, Z),
"case_id": list[str]}`. Training: random crops (centred on a lesion or a foreground voxel at the configured rates)
with augmentation; validation: centre crops.
Only train and val cases are ever preprocessed or loaded here; the test split is left to evaluation.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import cache
from dataset.attributes import lesion_classes
from dataset.augment import build_augmentation
from dataset.crops import center_crop, draw_centre, sample_crop
from dataset.intensity import build_normalizer, reference_params
from dataset.layout import Case, as_config
from dataset.split import select, split_for, write_split
from dataset.validate import DatasetSummary, validate_dataset
from utils.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropCentres:
    """Where training crops are centred (`dataset.crops.draw_centre`): a lesion voxel with `lesion_prob` (in cases
    that hold one of `lesion_classes`), else a foreground voxel with `foreground_prob`, else anywhere."""

    foreground_prob: float = 0.0
    lesion_prob: float = 0.0
    lesion_classes: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping) -> "CropCentres":
        lesion_prob = float(cfg.lesion_crop_prob)
        if not 0.0 <= lesion_prob <= 1.0:
            raise UserError(f"dataset.lesion_crop_prob: must lie in [0, 1], got {cfg.lesion_crop_prob}")
        return cls(float(cfg.foreground_crop_prob), lesion_prob, tuple(sorted(lesion_classes(cfg).values())))

    def draw(self, case, generator: torch.Generator | None = None):
        return draw_centre(case.foreground, case.class_locations, foreground_prob=self.foreground_prob,
                           class_prob=self.lesion_prob, classes=self.lesion_classes, generator=generator)


class CropDataset(Dataset):
    """One crop per preprocessed case; arrays are memory-mapped from the cache on each access. After
    `serve_ids_only()` an item holds only its `case_id` (for a training phase that reads no voxels)."""

    def __init__(self, entries: Mapping[str, Path], crop_size: Sequence[int], *, train: bool,
                 centres: CropCentres | None = None, augmentation=None):
        self.case_ids = list(entries)
        self.entries = list(entries.values())
        self.crop_size = [int(s) for s in crop_size]
        self.train = train
        self.centres = centres or CropCentres()
        self.augmentation = augmentation
        self._ids_only = torch.zeros((), dtype=torch.bool).share_memory_()  # shared with the loader's workers

    def serve_ids_only(self) -> None:
        self._ids_only.fill_(True)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        if self._ids_only:
            return {"case_id": self.case_ids[index]}
        case = cache.read_entry(self.entries[index])
        if self.train:
            image, label = sample_crop(case.image, case.label, self.crop_size, centre=self.centres.draw(case))
        else:
            image, label = center_crop(case.image, case.label, self.crop_size)
        image = torch.from_numpy(np.array(image, dtype=np.float32))
        label = torch.from_numpy(np.array(label, dtype=np.int64))
        if self.augmentation is not None:
            image, label = self.augmentation(image, label)
        return {"image": image[None], "label": label[None], "case_id": case.case_id}


class VolumeDataModule(pl.LightningDataModule):
    """Lightning data module over `cfg.dataset`; writes `split.json` into `run_dir` (if given). `split`: a split
    made earlier (stage 1's, named by `split_source` in messages) to reuse instead of splitting `cfg.split` anew."""

    def __init__(self, cfg: Mapping, run_dir: str | os.PathLike | None,
                 split: Mapping[str, Sequence[str]] | None = None, split_source: str = "split"):
        super().__init__()
        self.cfg = as_config(cfg)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._stored_split, self._split_source = split, split_source
        self.summary: DatasetSummary | None = None
        self.split: dict[str, list[str]] | None = None
        self._entries: dict[str, Path] = {}
        self.train_set: CropDataset | None = None
        self.val_set: CropDataset | None = None

    # -- preparation ---------------------------------------------------------------------------------------
    def _check_and_split(self) -> None:
        if self.summary is None:
            self.summary = validate_dataset(self.cfg)  # every bad-input check, before any work
            self.split = split_for(self.summary.cases, self.cfg.split, self._stored_split, self._split_source)

    def _preprocess(self, cases: Sequence[Case]) -> None:
        missing = [c for c in cases if c.case_id not in self._entries and cache.cached_stats(c, self.cfg) is None]
        if missing:  # first use: minutes on a large data set, so say so and show a bar
            log.info("preprocessing %d of %d case(s) onto the model grid (once; later runs read the cache)",
                     len(missing), len(cases))
            workers = min(int(self.cfg.num_workers), len(missing))
            with tqdm(total=len(missing), desc="preprocessing", unit="case", disable=None) as bar:  # on a terminal
                if workers > 1:  # decode in parallel (spawned: safe after CUDA init)
                    context = multiprocessing.get_context("spawn")
                    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                        for _ in pool.map(cache.ensure_cached, missing, [self.cfg] * len(missing)):
                            bar.update()
                else:
                    for case in missing:
                        cache.ensure_cached(case, self.cfg)
                        bar.update()
        for case in cases:
            if case.case_id not in self._entries:
                cache.load_preprocessed(case, self.cfg)
                self._entries[case.case_id] = cache.entry_folder(case, self.cfg)

    def prepare_data(self) -> None:
        self._check_and_split()
        self._preprocess(self.train_cases + self.val_cases)

    def setup(self, stage: str | None = None) -> None:
        self._check_and_split()
        if self.run_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            write_split(self.split, self.run_dir)
        self._preprocess(self.train_cases + self.val_cases)
        if self.train_set is None:
            cfg = self.cfg
            self.train_set = CropDataset(
                {c.case_id: self._entries[c.case_id] for c in self.train_cases}, cfg.crop_size, train=True,
                centres=CropCentres.from_config(cfg),
                augmentation=build_augmentation(cfg.augment, cfg.spacing))
            self.val_set = CropDataset({c.case_id: self._entries[c.case_id] for c in self.val_cases}, cfg.crop_size,
                                       train=False)

    # -- cases ---------------------------------------------------------------------------------------------
    def _cases(self, name: str) -> list[Case]:
        self._check_and_split()
        return select(self.summary.cases, self.split, name)

    @property
    def train_cases(self) -> list[Case]:
        return self._cases("train")

    @property
    def val_cases(self) -> list[Case]:
        return self._cases("val")

    def test_cases(self) -> list[Case]:
        """Held-out cases for evaluation (never loaded by this module)."""
        return self._cases("test")

    def reference_intensity_params(self) -> dict:
        """Median intensity params of the training volumes: store them with a model so generated volumes
        (which have no params of their own) can be mapped back to native units."""
        return reference_intensity_params(self.cfg, self.train_cases)

    def normalizer(self):
        """The data set's normalizer with its `reference` set to the training-set params."""
        normalizer = build_normalizer(self.cfg.intensity)
        normalizer.reference = self.reference_intensity_params()
        return normalizer

    # -- loaders -------------------------------------------------------------------------------------------
    def _loader(self, dataset: CropDataset, shuffle: bool) -> DataLoader:
        workers = int(self.cfg.num_workers)
        return DataLoader(dataset, batch_size=int(self.cfg.batch_size), shuffle=shuffle, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


def reference_intensity_params(cfg: Mapping, cases: Sequence[Case]) -> dict:
    """Median per-volume intensity params over `cases` (preprocessed on demand)."""
    cfg = as_config(cfg)
    return reference_params([cache.load_preprocessed(case, cfg).intensity_params for case in cases])


def split_cases(cfg: Mapping, split: Mapping[str, Sequence[str]] | None = None,
                split_source: str = "split") -> dict[str, list[Case]]:
    """Validate the data set and return its cases per split (`train`, `val`, `test`), as training splits it
    (`split`: a stored split to reuse, as `VolumeDataModule` takes it)."""
    summary = validate_dataset(cfg)
    split = split_for(summary.cases, as_config(cfg).split, split, split_source)
    return {name: select(summary.cases, split, name) for name in split}
