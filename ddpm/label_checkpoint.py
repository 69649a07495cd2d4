"""The label-generator checkpoint (`ddpm.label_generator.LabelGenerator`): saving it, loading it back, and the
metadata it stores.

It holds `"stage": "labels"`, `"labels": {"model": LabelGenerator.hparams, "dataset":
utils.checkpoint.dataset_settings(...), "lesion_classes": {name: index}, "attribute_table": [{name: {volume_ml,
count, centroid}} per training case], "volume_shape": [X, Y, Z], "split": {train, val, test} | None}` and the
weights under `state_dict["model.*"]`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dataset.attributes import LesionAttributes
from ddpm.label_generator import LabelGenerator
from utils.atomic import atomic_path
from utils.checkpoint import load_weights, read_checkpoint, rebuild
from utils.errors import UserError

STAGE = "labels"
STATE_PREFIX = "model."


def attributes_to_plain(attributes: Mapping[str, LesionAttributes]) -> dict[str, dict]:
    return {name: {"volume_ml": float(a.volume_ml), "count": int(a.count),
                   "centroid": None if a.centroid is None else [float(c) for c in a.centroid]}
            for name, a in attributes.items()}


def attributes_from_plain(data: Mapping[str, Mapping]) -> dict[str, LesionAttributes]:
    return {name: LesionAttributes(volume_ml=float(a["volume_ml"]), count=int(a["count"]),
                                   centroid=None if a["centroid"] is None else tuple(float(c) for c in a["centroid"]))
            for name, a in data.items()}


def checkpoint_metadata(model: LabelGenerator, *, dataset: Mapping, lesion_classes: Mapping[str, int],
                        attribute_table: Sequence[Mapping[str, LesionAttributes]], volume_shape: Sequence[int],
                        split: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    return {"model": dict(model.hparams), "dataset": dict(dataset),
            "lesion_classes": {str(k): int(v) for k, v in lesion_classes.items()},
            "attribute_table": [attributes_to_plain(row) for row in attribute_table],
            "volume_shape": [int(s) for s in volume_shape],
            "split": None if split is None else {k: list(v) for k, v in split.items()}}


def save_label_generator(model: LabelGenerator, path: str | os.PathLike, *, overwrite: bool = False,
                         **metadata: Any) -> Path:
    """A weights-only label-generator file (`checkpoint_metadata` keywords) that `load_label_generator` reads."""
    checkpoint = {"stage": STAGE, STAGE: checkpoint_metadata(model, **metadata),
                  "state_dict": {STATE_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def load_label_generator(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                         ) -> tuple[LabelGenerator, dict[str, Any]]:
    """The trained generator (eval mode, no gradients) and the checkpoint's `"labels"` metadata, with the
    attribute table as `LesionAttributes`. Any problem with the file is a one-line `UserError` naming it."""
    checkpoint = read_checkpoint(path, STAGE, map_location=map_location,
                                 needed="labels_ckpt= needs the last.ckpt/best.ckpt of a train.train_labels run")
    meta = dict(checkpoint[STAGE])
    needed = {"model", "dataset", "lesion_classes", "attribute_table", "volume_shape"}
    if not needed <= set(meta):
        raise UserError(f"{path}: malformed label-generator checkpoint (missing {sorted(needed - set(meta))})")
    model = rebuild(path, STAGE, meta["model"], [LabelGenerator])
    load_weights(model, checkpoint["state_dict"], STATE_PREFIX, path, "label generator")
    if not model.is_fitted:
        raise UserError(f"{path}: saved before the generator's diffusion training started (autoencoder phase); "
                        f"use a later checkpoint")
    meta["attribute_table"] = [attributes_from_plain(row) for row in meta["attribute_table"]]
    return model.to(map_location).eval().requires_grad_(False), meta
