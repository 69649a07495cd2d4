"""Lesion attributes of a label map, the user's requested attributes, and draws from the training distribution.

Per lesion class (`dataset.lesion_classes`: class names, or indices where `class_names` is null):
- `volume_ml`: the class's total volume in mL (voxel count x voxel volume from the affine);
- `count`: its connected components, 26-connectivity (voxels sharing a face, an edge or a corner are connected);
- `centroid`: the centre of mass of the largest component in normalised body coordinates, RAS order: the world
  (RAS mm) position mapped into the body box, where 0 and 1 are the box's low and high ends per axis. The body box
  is the axis-aligned world box spanned by the voxel centres at the 8 corners of the index bounding box of the
  non-background voxels (exact for axis-aligned grids, slightly larger than the voxels for oblique ones); an axis
  where the box is flat maps to 0.5. None when the class is absent. Ties for the largest component go to the one
  scipy numbers first.

Requested attributes (`lesion_volume_ml`, `lesion_count`, `lesion_centroid`) take a value for the single lesion
class, or a mapping {class name: value}; `check_requested` turns them into {class: {attribute: value}} or raises a
one-line UserError. `draw_case` and `fill_attributes` fill the unset ones empirically: one training case at random
among those whose lesion presence agrees with the request (a lesion where a volume > 0, a count >= 1 or a centroid
is requested, none where a volume or count of 0 is) and takes that case's values, so unset attributes keep their
joint training distribution (e.g. volume and count stay correlated). With `nearest=k` the case is drawn among the
k agreeing cases nearest to the requested values (log(1 + volume in mL), count and centroid, each scaled by its
spread over the training lesions): a draw from the training distribution given the request, so a large requested
lesion takes the centroid of a case whose large lesion had room there, not one where a speck sat near the cortex.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from dataset.validate import class_names
from utils.errors import UserError

CONNECTIVITY = 26
STRUCTURE = ndimage.generate_binary_structure(3, 3)  # 26-connectivity
REQUEST_KEYS = {"lesion_volume_ml": "volume_ml", "lesion_count": "count", "lesion_centroid": "centroid"}
AXES = ("r", "a", "s")


@dataclass(frozen=True)
class LesionAttributes:
    volume_ml: float
    count: int
    centroid: tuple[float, float, float] | None  # normalised body coordinates (RAS); None without a lesion


# the data set's lesion classes ------------------------------------------------------------------------------
def lesion_classes(dataset_cfg) -> dict[str, int]:
    """{class name: class index} of `dataset.lesion_classes` (names, or indices where class_names is null)."""
    names = class_names(dataset_cfg)
    found: dict[str, int] = {}
    for entry in dataset_cfg.get("lesion_classes") or []:
        if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
            if not 1 <= int(entry) < len(names):
                raise UserError(f"dataset.lesion_classes: class {entry} is not a foreground class (1.."
                                f"{len(names) - 1})")
            index = int(entry)
        elif isinstance(entry, str) and entry in names[1:]:
            index = names.index(entry)
        else:
            raise UserError(f"dataset.lesion_classes: {entry!r} is not a foreground class name of "
                            f"dataset.class_names ({', '.join(names[1:])})")
        found[names[index]] = index
    return found


# measuring a label map ---------------------------------------------------------------------------------------
def voxel_volume_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """scipy's (labelled components, count) of a boolean mask, 26-connectivity."""
    return ndimage.label(mask, structure=STRUCTURE)


def body_box(label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high) world RAS mm of the body box (see the module text); None for an all-background map."""
    foreground = np.nonzero(label)
    if not foreground[0].size:
        return None
    bounds = [(int(a.min()), int(a.max())) for a in foreground]
    corners = np.array([[bounds[0][i], bounds[1][j], bounds[2][k], 1.0]
                        for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    world = corners @ np.asarray(affine, dtype=np.float64).T
    return world[:, :3].min(axis=0), world[:, :3].max(axis=0)


def to_body(point_mm: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> tuple[float, float, float]:
    low, high = box
    extent = high - low
    safe = np.where(extent > 0, extent, 1.0)
    return tuple(float(v) for v in np.where(extent > 0, (np.asarray(point_mm) - low) / safe, 0.5))


def measure(label: np.ndarray, affine: np.ndarray, classes: Mapping[str, int]) -> dict[str, LesionAttributes]:
    """Attributes of every lesion class in `classes` ({name: index}) of an integer label map."""
    label = np.asarray(label)
    unit = voxel_volume_ml(affine)
    box = body_box(label, affine)
    found = {}
    for name, index in classes.items():
        mask = label == index
        labelled, count = components(mask)
        centroid = None
        if count:
            sizes = np.bincount(labelled.ravel())[1:]
            largest = int(np.argmax(sizes)) + 1
            centre = np.array(ndimage.center_of_mass(labelled == largest), dtype=np.float64)
            centroid = to_body(np.asarray(affine, dtype=np.float64)[:3] @ np.append(centre, 1.0), box)
        found[name] = LesionAttributes(volume_ml=float(mask.sum()) * unit, count=int(count), centroid=centroid)
    return found


# requested attributes ----------------------------------------------------------------------------------------
def _number(value) -> float | None:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return None


def _check_value(key: str, value, shown: str):
    if key == "lesion_volume_ml":
        number = _number(value)
        if number is None or not math.isfinite(number) or number < 0:
            raise UserError(f"{shown}: must be a lesion volume in mL >= 0")
        return number
    if key == "lesion_count":
        number = _number(value)
        if number is None or not number.is_integer() or number < 0:
            raise UserError(f"{shown}: must be a whole number of lesions >= 0")
        return int(number)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise UserError(f"{shown}: must be 3 normalised body coordinates [r, a, s], each in [0, 1]")
    numbers = [_number(v) for v in value]
    if any(n is None or not 0.0 <= n <= 1.0 for n in numbers):
        raise UserError(f"{shown}: must be 3 normalised body coordinates [r, a, s], each in [0, 1]")
    return tuple(numbers)


def check_requested(requested: Mapping, lesion_names: Sequence[str]) -> dict[str, dict]:
    """{class: {"volume_ml"|"count"|"centroid": value}} of the set attributes (None = unset). A bare value
    applies to the data set's only lesion class; a mapping {class name: value} names the class."""
    checked: dict[str, dict] = {}
    for key, attribute in REQUEST_KEYS.items():
        value = requested.get(key)
        if value is None:
            continue
        if isinstance(value, Mapping):
            per_class = dict(value.items())
        elif len(lesion_names) == 1:
            per_class = {lesion_names[0]: value}
        else:
            raise UserError(f"{key}={value}: the data set has {len(lesion_names)} lesion classes "
                            f"({', '.join(lesion_names) or 'none'}); give {key}={{class_name: value}}")
        for name, item in per_class.items():
            if name not in lesion_names:
                raise UserError(f"{key}: unknown lesion class {name!r} (lesion classes: "
                                f"{', '.join(lesion_names) or 'none; set dataset.lesion_classes'})")
            if item is not None:
                shown = f"{key}={item}" if len(per_class) == 1 else f"{key}.{name}={item}"
                checked.setdefault(str(name), {})[attribute] = _check_value(key, item, shown)
    for name, values in checked.items():
        present, absent = wants(values)
        if present and absent:
            raise UserError(f"lesion attributes of {name}: {values} ask for a lesion and for none at once (a "
                            f"volume or count of 0 with a nonzero volume, a count >= 1 or a centroid)")
    return checked


def wants(values: Mapping) -> tuple[bool, bool]:
    """(the request needs the lesion present, the request needs it absent)."""
    present = values.get("volume_ml", 0) > 0 or values.get("count", 0) >= 1 or "centroid" in values
    absent = values.get("volume_ml") == 0 or values.get("count") == 0
    return present, absent


def request_distances(requested: Mapping[str, Mapping], cases: Sequence[Mapping[str, LesionAttributes]],
                      table: Sequence[Mapping[str, LesionAttributes]]) -> np.ndarray | None:
    """Distance of each case to the requested values: the root sum of squares over the requested volumes
    (log(1 + mL)), counts and centroids (Euclidean), each divided by its spread (standard deviation; for the
    centroid, root mean square distance to the mean) over the lesions of `table`; None where no lesion value is
    asked (or none varies in training), when every case is as near."""
    squared, asked = np.zeros(len(cases)), False
    for name, values in requested.items():
        lesions = [case[name] for case in table if case[name].count > 0]
        if wants(values)[1] or not lesions:
            continue  # no lesion asked for (the agreeing cases have none), or none in training to scale by
        for attribute in [key for key in ("volume_ml", "count", "centroid") if key in values]:
            if attribute == "centroid":
                known = np.array([lesion.centroid for lesion in lesions], dtype=float)
                spread = float(np.sqrt(((known - known.mean(0)) ** 2).sum(1).mean()))
                at = np.array([case[name].centroid for case in cases], dtype=float)
                gap = np.linalg.norm(at - np.asarray(values["centroid"], dtype=float), axis=1)
            else:
                scale = np.log1p if attribute == "volume_ml" else np.asarray
                known = scale(np.array([getattr(lesion, attribute) for lesion in lesions], dtype=float))
                spread = float(known.std())
                at = scale(np.array([getattr(case[name], attribute) for case in cases], dtype=float))
                gap = np.abs(at - scale(float(values[attribute])))
            if spread > 0:
                squared, asked = squared + (gap / spread) ** 2, True
    return np.sqrt(squared) if asked else None


def draw_case(requested: Mapping[str, Mapping], table: Sequence[Mapping[str, LesionAttributes]],
              generator: np.random.Generator, nearest: int | None = None) -> Mapping[str, LesionAttributes]:
    """One training case drawn uniformly among those whose lesion presence agrees with the request (with
    `nearest`: among the `nearest` of them closest to the requested values, `request_distances`)."""
    if not table:
        raise UserError("lesion attributes: no training cases to draw unset attributes from")
    if nearest is not None and (not isinstance(nearest, int) or isinstance(nearest, bool) or nearest < 1):
        raise UserError(f"draw_nearest={nearest}: must be a whole number of training cases >= 1, or null")
    candidates = []
    for case in table:
        ok = True
        for name, values in requested.items():
            present, absent = wants(values)
            has = case[name].count > 0
            ok &= not (present and not has) and not (absent and has)
        if ok:
            candidates.append(case)
    if not candidates:
        raise UserError(f"lesion attributes {dict(requested)}: no training case agrees with them (a lesion "
                        f"where one is asked for, none where none is); ask for something the training data shows")
    distances = None if nearest is None else request_distances(requested, candidates, table)
    if distances is not None and nearest < len(candidates):
        candidates = [candidates[i] for i in np.argsort(distances, kind="stable")[:nearest]]
    return candidates[int(generator.integers(len(candidates)))]


def fill_attributes(requested: Mapping[str, Mapping], case: Mapping[str, LesionAttributes],
                    lesion_names: Sequence[str]) -> dict[str, LesionAttributes]:
    """Every lesion class's attributes: the checked request where set, the rest `case`'s values."""
    drawn = {}
    for name in lesion_names:
        values = requested.get(name, {})
        base = case[name]
        drawn[name] = LesionAttributes(volume_ml=float(values.get("volume_ml", base.volume_ml)),
                                       count=int(values.get("count", base.count)),
                                       centroid=values.get("centroid", base.centroid))
    return drawn


# CSV rows ----------------------------------------------------------------------------------------------------
def columns(name: str, prefix: str = "") -> dict[str, str]:
    """CSV column of each attribute of lesion class `name` (centroid: one column per RAS axis)."""
    base = f"{prefix}{name}_"
    return {"volume_ml": f"{base}volume_ml", "count": f"{base}count",
            **{f"centroid_{axis}": f"{base}centroid_{axis}" for axis in AXES}}


def as_row(attributes: Mapping[str, LesionAttributes | Mapping], prefix: str = "") -> dict[str, object]:
    """One CSV row (empty strings for unset values) of measured attributes or a checked request."""
    row: dict[str, object] = {}
    for name, values in attributes.items():
        if isinstance(values, LesionAttributes):
            values = {"volume_ml": values.volume_ml, "count": values.count, "centroid": values.centroid}
        names = columns(name, prefix)
        row[names["volume_ml"]] = values.get("volume_ml", "")
        row[names["count"]] = values.get("count", "")
        centroid = values.get("centroid")
        for i, axis in enumerate(AXES):
            row[names[f"centroid_{axis}"]] = "" if centroid is None else centroid[i]
    return row


def read_requested_csv(path: str | Path, lesion_names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """{case id: checked request} from a CSV with a `case_id` column and the columns of `columns(name, prefix)`,
    prefix `requested_` when the file has such columns (the generator's requested + measured CSV), else none."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: requested-attributes CSV not found")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = set(rows[0]) if rows else set()
    if "case_id" not in header:
        raise UserError(f"{path}: needs a case_id column (the generated label maps' file stems)")
    prefix = "requested_" if any(h.startswith("requested_") for h in header) else ""
    requests = {}
    for line, row in enumerate(rows, start=2):
        request: dict[str, dict] = {}
        for name in lesion_names:
            names = columns(name, prefix)
            try:
                raw = {key: float(row[column]) for key, column in names.items() if row.get(column, "") != ""}
            except ValueError:
                raise UserError(f"{path}: line {line}: a non-number in the {name} columns") from None
            values = {}
            if "volume_ml" in raw:
                values["lesion_volume_ml"] = raw["volume_ml"]
            if "count" in raw:
                values["lesion_count"] = raw["count"]
            axes = [raw.get(f"centroid_{axis}") for axis in AXES]
            if any(a is not None for a in axes):
                values["lesion_centroid"] = axes if all(a is not None for a in axes) else [None]
            try:
                checked = check_requested({k: {name: v} for k, v in values.items()}, lesion_names)
            except UserError as err:
                raise UserError(f"{path}: line {line}: {err}") from None
            request.update(checked)
        requests[str(row["case_id"])] = request
    return requests


def read_seed_index(path: str | Path) -> dict[str, int] | None:
    """{case id: seed index} from the `seed_index` column of `ddpm.generate`'s attributes CSV (the pairs of one index
    share their seeds and drawn attributes); None without the column."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "seed_index" not in rows[0]:
        return None
    groups = {}
    for line, row in enumerate(rows, start=2):
        try:
            groups[row["case_id"]] = int(row["seed_index"])
        except ValueError:
            raise UserError(f"{path}: line {line}: seed_index={row['seed_index']!r} is not an integer") from None
    return groups
