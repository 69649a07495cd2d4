"""Edited copies of training label maps for the augmentation study (`python -m evaluation.augmentation
action=edit_maps edit.labels=DIR edit.out=DIR`): per map `edit.per_map` random lesion edits (insert, move, grow or
shrink through `dataset.edit_labels`, with its anatomical checks), written as `<case>_edit<j>.nii.gz` plus an
`edits.json` of what each one did. Also the study's headline (lesion) class, shared by the edits and the study."""
from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage
from tqdm import tqdm

from dataset.attributes import lesion_classes
from dataset.edit_labels import EditOptions, as_label_array, edit_label_file, edit_label_map
from dataset.io import load_nifti
from dataset.validate import class_names, resolve_class, validate_dataset
from evaluation.pairing import list_nifti
from evaluation.report import write_json
from evaluation.segmentation import load_split
from utils.atomic import check_writable
from utils.errors import UserError

EDIT_OPS = ("insert", "move", "grow", "shrink")


def headline_class(cfg, names: list[str]) -> int:
    """`lesion_class`, else the first of `dataset.lesion_classes`; with lesion classes it must be one of them
    (the segmenter centres its class crops on them and selects its weights on their Dice)."""
    classes = lesion_classes(cfg.dataset)
    if cfg.lesion_class is None:
        if not classes:
            raise UserError("lesion_class: set it (a class name or index), or dataset.lesion_classes")
        return next(iter(classes.values()))
    lesion = resolve_class(cfg.lesion_class, names, "lesion_class")
    if classes and lesion not in classes.values():
        raise UserError(f"lesion_class: {names[lesion]} is not one of dataset.lesion_classes ({', '.join(classes)}),"
                        " the classes the segmenter's crops and model selection favour; make it one")
    return lesion


def random_edit(labels: np.ndarray, affine: np.ndarray, lesion: int, *, rng: np.random.Generator, edit_cfg,
                options: EditOptions, source: str):
    """(op, dataset.edit_labels op, its arguments, options, result) of one random edit that changes the map and
    passes the anatomical checks, within `edit.attempts` draws; None if none did. A map without a lesion can
    only get an insert."""
    ops = [str(op) for op in edit_cfg.ops]
    if not (labels == lesion).any():
        ops = [op for op in ops if op == "insert"]
    if not ops:
        return None
    hosts = np.argwhere(np.isin(labels, list(options.host_classes)))
    _, n_lesions = ndimage.label(labels == lesion, structure=np.ones((3, 3, 3)))
    for _ in range(int(edit_cfg.attempts)):
        op = ops[rng.integers(len(ops))]
        edit_options = replace(options, component=int(rng.integers(max(n_lesions, 1))))
        if op == "insert":
            if not len(hosts):
                return None
            args = {"radius_mm": float(rng.uniform(*edit_cfg.radius_mm)),
                    "center_vox": [int(v) for v in hosts[rng.integers(len(hosts))]], "shape": str(edit_cfg.shape),
                    "seed": int(rng.integers(1 << 31))}
        elif op == "move":
            direction = rng.normal(size=3)
            args = {"offset_mm": (direction / np.linalg.norm(direction) * rng.uniform(*edit_cfg.move_mm)).tolist()}
        else:
            args = {"factor": float(rng.uniform(*(edit_cfg.grow if op == "grow" else edit_cfg.shrink)))}
        name = "scale" if op in ("grow", "shrink") else op
        try:
            result = edit_label_map(labels, affine, name, lesion, options=edit_options, source=source, **args)
        except UserError:
            continue
        if result.changed_voxels:
            return op, name, args, edit_options, result
    return None


def check_edit_settings(edit_cfg) -> None:
    unknown = [op for op in edit_cfg.ops if op not in EDIT_OPS]
    if unknown or not edit_cfg.ops:
        raise UserError(f"edit.ops: {list(edit_cfg.ops)}: expected some of {', '.join(EDIT_OPS)}")
    for key, low in (("radius_mm", 0.0), ("move_mm", 0.0), ("grow", 1.0), ("shrink", 0.0)):
        values = [float(v) for v in edit_cfg[key]]
        if len(values) != 2 or not low < values[0] <= values[1] or (key == "shrink" and values[1] >= 1.0):
            raise UserError(f"edit.{key}={values}: expected [min, max] with {low:g} < min <= max"
                            + (" < 1" if key == "shrink" else ""))
    if int(edit_cfg.per_map) < 1 or int(edit_cfg.attempts) < 1:
        raise UserError("edit.per_map and edit.attempts: expected positive integers")


def make_edited_maps(cfg: DictConfig) -> dict:
    """`edit.per_map` edited copies of every training label map in `edit.labels`, into `edit.out`."""
    edit_cfg = cfg.edit
    if edit_cfg.labels is None or edit_cfg.out is None:
        raise UserError("edit.labels and edit.out: required with action=edit_maps (training label maps in, "
                        "edited maps out)")
    check_edit_settings(edit_cfg)
    names = class_names(cfg.dataset)
    lesion = headline_class(cfg, names)
    options = EditOptions(
        host_classes=[resolve_class(c, names, "edit.host_classes", allow_background=True)
                      for c in edit_cfg.host_classes],
        forbidden_classes=[resolve_class(c, names, "edit.forbidden_classes", allow_background=True)
                           for c in edit_cfg.forbidden_classes],
        min_inside_fraction=float(edit_cfg.min_inside_fraction), label_nc=len(names))
    maps = list_nifti(edit_cfg.labels, "label map")
    split = load_split(cfg, validate_dataset(cfg.dataset).cases)
    not_train = [stem for stem in maps if stem not in set(split["train"])]
    if not_train:
        raise UserError(f"{edit_cfg.labels}: {', '.join(not_train[:3])} not training case(s) of the split; only "
                        "training label maps are edited (python -m train.export_split split=train)")
    out = Path(edit_cfg.out)
    planned = {(stem, j): out / f"{stem}_edit{j}.nii.gz" for stem in maps for j in range(int(edit_cfg.per_map))}
    for path in [*planned.values(), out / "edits.json"]:
        check_writable(path, cfg.overwrite)
    records, failed = [], []
    for (stem, j), path in tqdm(planned.items(), desc="edited label maps", unit="map"):
        labels, affine = load_nifti(maps[stem])
        labels = as_label_array(labels, str(maps[stem]))
        rng = np.random.default_rng([int(edit_cfg.seed), zlib.crc32(stem.encode()), j])
        found = random_edit(labels, affine, lesion, rng=rng, edit_cfg=edit_cfg, options=options,
                            source=str(maps[stem]))
        if found is None:
            failed.append(path.name)
            continue
        op, name, args, edit_options, _ = found
        result = edit_label_file(maps[stem], path, name, lesion, overwrite=cfg.overwrite, options=edit_options,
                                 **args)
        component = {} if op == "insert" else {"component": edit_options.component}
        records.append({"file": path.name, "source": stem, "op": op, **args, **component,
                        "summary": result.summary()})
    report = {"lesion_class": names[lesion], "edits": records, "failed": failed,
              "settings": OmegaConf.to_container(edit_cfg, resolve=True)}
    write_json(report, out / "edits.json", cfg.overwrite)
    print(f"{len(records)} edited label map(s) in {out}" + (f"; no valid edit found for {len(failed)}: "
                                                             f"{', '.join(failed[:3])}" if failed else ""))
    return report
