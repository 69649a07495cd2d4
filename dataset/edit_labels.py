"""Edit a label map on its own grid: move, scale, insert or remove one lesion (a counterfactual label map).

    python -m dataset.edit_labels in=LABELS.nii.gz out=OUT.nii.gz op=move class=4 offset_mm=[10,0,0]
    python -m dataset.edit_labels in=... out=... op=scale class=4 factor=1.5
    python -m dataset.edit_labels in=... out=... op=insert class=4 radius_mm=6 center_mm=[-20,10,30]
    python -m dataset.edit_labels in=... out=... op=remove class=4 at=[40,52,17]

Offsets, centres and radii are millimetres in the world (RAS) frame of the file's affine and go through that
affine to voxels, so anisotropic and oblique grids behave physically. Move, scale and remove act on one connected
component of the class (`component=largest`, an index by decreasing size, or the one holding voxel `at`). The
output has the input's shape and affine and an integer type; the input file is never touched.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage

from dataset.io import is_nifti_name, load_nifti, save_nifti, smallest_label_dtype
from dataset.label_masks import (CONNECTIVITY_RANK, bounding_box, box_grid, connectivity_structure, host_class,
                                 mask_from_coords)
from utils.atomic import check_writable
from utils.errors import UserError, exit_on_user_error

OPS = ("move", "scale", "insert", "remove")
SHAPES = ("ellipsoid", "blob")
ROUND_EPS = 1e-9  # nearest-neighbour rounding: makes exact half-voxel ties immune to floating-point noise
BLOB_BUMPS = 8


@dataclass(frozen=True, kw_only=True)
class EditOptions:
    """Which component to edit and the anatomical rules an edited lesion must obey."""

    component: str | int = "largest"  # "largest" or an index into the components sorted by decreasing size
    at: Sequence[int] | None = None  # a voxel inside the component (takes precedence over `component`)
    fill_class: int | None = None  # class for vacated voxels; None: the host class around the component
    host_classes: Sequence[int] | None = None  # None: the host class (move/scale), the class at the centre (insert)
    forbidden_classes: Sequence[int] = ()
    min_inside_fraction: float = 1.0
    connectivity: int = 26
    label_nc: int | None = None


@dataclass
class EditResult:
    labels: np.ndarray
    op: str
    class_index: int
    changed_voxels: int
    voxels_before: int
    voxels_after: int
    voxel_volume_mm3: float
    note: str = ""

    def summary(self) -> str:
        before, after = self.voxels_before * self.voxel_volume_mm3, self.voxels_after * self.voxel_volume_mm3
        text = (f"{self.op} class {self.class_index}: {self.changed_voxels} voxels changed, component "
                f"{self.voxels_before} -> {self.voxels_after} voxels, {before:.1f} -> {after:.1f} mm^3")
        return f"{text} ({self.note})" if self.note else text


def _int(value, name: str, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise UserError(f"{name}={value}: expected an integer{bound}")
    return int(value)


def _vector3(value, name: str, *, positive: bool = False, allow_scalar: bool = False) -> np.ndarray:
    kind = "a positive number or 3 positive numbers" if allow_scalar else "3 numbers"
    if value is None:
        raise UserError(f"{name} is required: {kind}")
    values = [value] * 3 if allow_scalar and np.isscalar(value) else value
    try:
        vector = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        vector = np.empty(0)
    ok = vector.shape == (3,) and np.all(np.isfinite(vector)) and not isinstance(value, (str, bool))
    if not ok or (positive and np.any(vector <= 0)):
        raise UserError(f"{name}={value}: expected {kind}")
    return vector


def _fraction(value, name: str, *, upper_open: bool) -> float:
    number = value if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) else np.nan
    if not (0.0 <= number < 1.0 if upper_open else 0.0 <= number <= 1.0):
        raise UserError(f"{name}={value}: expected a number in [0, 1{')' if upper_open else ']'}")
    return float(number)


def _check_classes(labels: np.ndarray, class_index: int, options: EditOptions, source: str) -> None:
    _int(class_index, "class")
    if labels.size and labels.min() < 0:
        raise UserError(f"{source}: negative label values ({int(labels.min())}); expected classes >= 0")
    if options.connectivity not in CONNECTIVITY_RANK:
        raise UserError(f"connectivity={options.connectivity}: expected 6, 18 or 26")
    _fraction(options.min_inside_fraction, "min_inside_fraction", upper_open=False)
    named = [("class", [class_index]), ("fill_class", [] if options.fill_class is None else [options.fill_class]),
             ("host_classes", options.host_classes or []), ("forbidden_classes", options.forbidden_classes)]
    named = [(name, [_int(value, name) for value in values]) for name, values in named]
    if options.label_nc is None:
        return
    label_nc = _int(options.label_nc, "label_nc", minimum=1)
    for name, values in named:
        if any(v >= label_nc for v in values):
            raise UserError(f"{source}: {name} {max(values)} is not below label_nc={label_nc}")
    if labels.size and labels.max() >= label_nc:
        raise UserError(f"{source}: the label map holds class {int(labels.max())}, not below label_nc={label_nc}")


def voxel_volume_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def offset_to_voxels(affine: np.ndarray, offset_mm) -> np.ndarray:
    """World offset in mm -> nearest whole-voxel shift along the array axes."""
    shift = np.linalg.solve(np.asarray(affine, dtype=np.float64)[:3, :3], _vector3(offset_mm, "offset_mm"))
    return np.floor(shift + 0.5 + ROUND_EPS).astype(np.int64)


def select_component(labels: np.ndarray, class_index: int, options: EditOptions, source: str) -> np.ndarray:
    """Boolean mask of the chosen connected component of `class_index`."""
    present = labels == class_index
    if not present.any():
        raise UserError(f"{source}: class {class_index} is not present in the label map")
    box = bounding_box(present)  # label only the class's bounding box: whole CT volumes stay fast
    local, count = ndimage.label(present[box], structure=connectivity_structure(options.connectivity))
    components = np.zeros(labels.shape, dtype=local.dtype)
    components[box] = local
    if options.at is not None:
        at = _vector3(options.at, "at")
        voxel = tuple(int(v) for v in at)
        if not np.array_equal(at, voxel) or not all(0 <= v < s for v, s in zip(voxel, labels.shape)):
            raise UserError(f"at={list(options.at)}: not a voxel index inside the volume of shape {labels.shape}")
        if components[voxel] == 0:
            raise UserError(f"{source}: voxel at={list(voxel)} has class {int(labels[voxel])}, not {class_index}")
        return components == components[voxel]
    try:
        index = 0 if options.component == "largest" else _int(options.component, "component")
    except UserError:
        raise UserError(f"component={options.component}: expected largest or an index >= 0 (0: largest)") from None
    if index >= count:
        raise UserError(f"{source}: component={index} but class {class_index} has {count} component(s)")
    sizes = np.bincount(local.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")  # largest first; ties keep scan order, so the choice is stable
    return components == order[index] + 1


def check_placement(under: np.ndarray, class_index: int, host_classes: Sequence[int], options: EditOptions,
                    what: str, source: str) -> None:
    """`under` (the anatomy under each new lesion voxel) must avoid forbidden classes and be (mostly) host."""
    forbidden = np.isin(under, list(options.forbidden_classes))
    if forbidden.any():
        hit = sorted({int(v) for v in under[forbidden]})
        raise UserError(f"{source}: the {what} lesion of class {class_index} would overlap forbidden class(es) "
                        f"{hit} ({int(forbidden.sum())} voxels)")
    inside = float(np.isin(under, list(host_classes)).mean())
    if inside + 1e-12 < float(options.min_inside_fraction):
        raise UserError(f"{source}: only {inside:.1%} of the {what} lesion of class {class_index} lies inside host "
                        f"class(es) {[int(c) for c in host_classes]} (min_inside_fraction="
                        f"{float(options.min_inside_fraction):g})")


def _result(labels, edited, op, class_index, before, after, affine, note="") -> EditResult:
    return EditResult(labels=edited, op=op, class_index=class_index, changed_voxels=int((edited != labels).sum()),
                      voxels_before=int(before), voxels_after=int(after),
                      voxel_volume_mm3=voxel_volume_mm3(affine), note=note)


def _relocate(labels, affine, class_index, mask, new_mask_fn, op, what, options, source, note="") -> EditResult:
    """Shared body of move and scale: vacate the component, place its new version, check anatomy.

    The checks see the anatomy under the old lesion as its host class, whatever `fill_class` paints there."""
    host = host_class(labels, mask, class_index, options.connectivity, source)
    new_mask = new_mask_fn(mask)
    under = labels[new_mask]
    under[mask[new_mask]] = host
    hosts = [host] if options.host_classes is None else list(options.host_classes)
    check_placement(under, class_index, hosts, options, what, source)
    edited = labels.copy()
    edited[mask] = host if options.fill_class is None else int(options.fill_class)
    edited[new_mask] = class_index
    return _result(labels, edited, op, class_index, mask.sum(), new_mask.sum(), affine, note)


def move_component(labels: np.ndarray, affine: np.ndarray, class_index: int, *, offset_mm,
                   options: EditOptions = EditOptions(), source: str = "labels") -> EditResult:
    """Translate one component by `offset_mm` (world mm, rounded to whole voxels)."""
    _check_classes(labels, class_index, options, source)
    mask = select_component(labels, class_index, options, source)
    shift = offset_to_voxels(affine, offset_mm)
    applied = np.asarray(affine, dtype=np.float64)[:3, :3] @ shift

    def moved(component):
        return mask_from_coords(np.argwhere(component) + shift, labels.shape, class_index, "moved", source)

    return _relocate(labels, affine, class_index, mask, moved, "move", "moved", options, source,
                     f"shift {shift.tolist()} voxels = {np.round(applied, 2).tolist()} mm")


def scale_component(labels: np.ndarray, affine: np.ndarray, class_index: int, *, factor,
                    options: EditOptions = EditOptions(), source: str = "labels") -> EditResult:
    """Scale one component about its centroid by `factor` (one number, or one per world axis)."""
    _check_classes(labels, class_index, options, source)
    factors = _vector3(factor, "factor", positive=True, allow_scalar=True)
    mask = select_component(labels, class_index, options, source)
    if np.all(factors == factors[0]):
        forward = np.eye(3) * factors[0]  # isotropic in mm is isotropic in voxels, whatever the affine
    else:
        linear = np.asarray(affine, dtype=np.float64)[:3, :3]
        forward = np.linalg.solve(linear, np.diag(factors) @ linear)
    inverse = np.linalg.inv(forward)

    def scaled(component):
        coords = np.argwhere(component)
        centroid = coords.mean(axis=0)
        corners = np.array(list(itertools.product(*zip(coords.min(0) - 0.5, coords.max(0) + 0.5))))
        mapped = (corners - centroid) @ forward.T + centroid
        grid = box_grid(np.floor(mapped.min(0)).astype(np.int64), np.ceil(mapped.max(0)).astype(np.int64))
        src = np.floor((grid - centroid) @ inverse.T + centroid + 0.5 + ROUND_EPS).astype(np.int64)
        valid = np.all((src >= 0) & (src < np.asarray(labels.shape)), axis=1)
        hit = np.zeros(len(grid), dtype=bool)
        hit[valid] = component[tuple(src[valid].T)]
        return mask_from_coords(grid[hit], labels.shape, class_index, "scaled", source)

    return _relocate(labels, affine, class_index, mask, scaled, "scale", "scaled", options, source,
                     f"factor {np.round(factors, 3).tolist()}")


def _blob_radius(directions: np.ndarray, seed: int, amplitude: float) -> np.ndarray:
    """Smooth random radius (relative, within 1 +- amplitude) for unit `directions`: a few soft bumps."""
    rng = np.random.default_rng(seed)
    bumps = rng.normal(size=(BLOB_BUMPS, 3))
    bumps /= np.linalg.norm(bumps, axis=1, keepdims=True)
    weights = rng.uniform(-1.0, 1.0, size=BLOB_BUMPS)
    field = np.exp(4.0 * (directions @ bumps.T - 1.0)) @ weights
    return 1.0 + amplitude * np.tanh(2.0 * field)


def insert_lesion(labels: np.ndarray, affine: np.ndarray, class_index: int, *, radius_mm, center_mm=None,
                  center_vox=None, shape: str = "ellipsoid", seed: int = 0, blob_amplitude: float = 0.3,
                  options: EditOptions = EditOptions(), source: str = "labels") -> EditResult:
    """Insert an ellipsoid (semi-axes `radius_mm` along the world axes) or a smooth random blob of that size."""
    _check_classes(labels, class_index, options, source)
    radii = _vector3(radius_mm, "radius_mm", positive=True, allow_scalar=True)
    if shape not in SHAPES:
        raise UserError(f"shape={shape}: expected one of {', '.join(SHAPES)}")
    amplitude = _fraction(blob_amplitude, "blob_amplitude", upper_open=True)
    if (center_mm is None) == (center_vox is None):
        raise UserError("insert needs exactly one of center_mm=[x,y,z] (world mm) or center_vox=[i,j,k]")
    affine = np.asarray(affine, dtype=np.float64)
    if center_mm is not None:
        center = _vector3(center_mm, "center_mm")
    else:
        center = affine[:3, :3] @ _vector3(center_vox, "center_vox") + affine[:3, 3]
    reach = radii * (1.0 + amplitude if shape == "blob" else 1.0)
    corners = center + np.array(list(itertools.product([-1, 1], repeat=3))) * reach
    corner_vox = np.linalg.solve(affine[:3, :3], (corners - affine[:3, 3]).T).T
    grid = box_grid(np.floor(corner_vox.min(0)).astype(np.int64) - 1, np.ceil(corner_vox.max(0)).astype(np.int64) + 1)
    relative = (grid @ affine[:3, :3].T + affine[:3, 3] - center) / radii
    distance = np.linalg.norm(relative, axis=1)
    if shape == "ellipsoid":
        inside = distance <= 1.0
    else:
        directions = relative / np.maximum(distance, 1e-12)[:, None]
        inside = distance <= _blob_radius(directions, _int(seed, "seed"), amplitude)
    new_mask = mask_from_coords(grid[inside], labels.shape, class_index, "inserted", source)
    if options.host_classes is None:
        center_voxel = np.linalg.solve(affine[:3, :3], center - affine[:3, 3])
        center_voxel = np.clip(np.floor(center_voxel + 0.5).astype(np.int64), 0, np.asarray(labels.shape) - 1)
        hosts = [int(labels[tuple(center_voxel)])]
    else:
        hosts = list(options.host_classes)
    check_placement(labels[new_mask], class_index, hosts, options, "inserted", source)
    edited = labels.copy()
    edited[new_mask] = class_index
    return _result(labels, edited, "insert", class_index, 0, new_mask.sum(), affine, f"{shape} in class(es) {hosts}")


def remove_component(labels: np.ndarray, affine: np.ndarray, class_index: int, *,
                     options: EditOptions = EditOptions(), source: str = "labels") -> EditResult:
    """Remove one component, filling it with `fill_class` (default: the host class around it)."""
    _check_classes(labels, class_index, options, source)
    mask = select_component(labels, class_index, options, source)
    fill = host_class(labels, mask, class_index, options.connectivity, source) if options.fill_class is None \
        else int(options.fill_class)
    edited = labels.copy()
    edited[mask] = fill
    return _result(labels, edited, "remove", class_index, mask.sum(), 0, affine, f"filled with class {fill}")


OP_FUNCTIONS = {"move": move_component, "scale": scale_component, "insert": insert_lesion, "remove": remove_component}


def edit_label_map(labels: np.ndarray, affine: np.ndarray, op: str, class_index: int, *,
                   options: EditOptions = EditOptions(), source: str = "labels", **op_args) -> EditResult:
    """Dispatch to one of the four operations; `op_args` are that operation's own keyword arguments."""
    if op not in OPS:
        raise UserError(f"op={op}: expected one of {', '.join(OPS)}")
    return OP_FUNCTIONS[op](labels, affine, class_index, options=options, source=source, **op_args)


def as_label_array(array: np.ndarray, source: str) -> np.ndarray:
    """int32 copy of a label map (room for any class index, half the memory of int64); floats must be whole."""
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise UserError(f"{source}: not a label map (non-integer values)")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise UserError(f"{source}: label values outside 0..{np.iinfo(np.int32).max}; expected class indices")
    return array.astype(np.int32)


def edit_label_file(in_path, out_path, op: str, class_index: int, *, overwrite: bool = False,
                    options: EditOptions = EditOptions(), **op_args) -> EditResult:
    """Read `in_path`, edit, write `out_path` on the same grid (atomically; never over the input)."""
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.resolve() == in_path.resolve():
        raise UserError(f"{out_path}: the output must differ from the input (the input is never modified)")
    if not is_nifti_name(out_path):
        raise UserError(f"{out_path}: output must end in .nii or .nii.gz")
    check_writable(out_path, overwrite)
    raw, affine = load_nifti(in_path)
    labels = as_label_array(raw, str(in_path))
    result = edit_label_map(labels, affine, op, class_index, options=options, source=str(in_path), **op_args)
    needed = smallest_label_dtype(result.labels)  # keep the input's integer type when the result fits it
    dtype = raw.dtype if np.issubdtype(raw.dtype, np.integer) and np.can_cast(needed, raw.dtype) else needed
    save_nifti(result.labels.astype(dtype), affine, out_path, overwrite=overwrite, dtype=dtype)
    return result


OP_ONLY_KEYS = {"offset_mm": "move", "factor": "scale", "radius_mm": "insert", "center_mm": "insert",
                "center_vox": "insert"}


def _as_list(value) -> list | None:
    return None if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


@hydra.main(version_base="1.3", config_path="../config", config_name="edit_labels")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    values = OmegaConf.to_container(cfg, resolve=True)
    for key in ("in", "out", "op", "class"):
        if values.get(key) is None:
            raise UserError(f"{key}=... is required (python -m dataset.edit_labels in=LABELS.nii.gz out=OUT.nii.gz "
                            "op=move|scale|insert|remove class=K ...)")
    op = values["op"]
    if op not in OPS:
        raise UserError(f"op={op}: expected one of {', '.join(OPS)}")
    unused = [key for key, owner in OP_ONLY_KEYS.items() if owner != op and values[key] is not None]
    if op == "insert":
        unused += [key for key in ("fill_class", "at") if values[key] is not None]
    if unused:
        raise UserError(f"{unused[0]}={values[unused[0]]}: not used by op={op}")
    options = EditOptions(component=values["component"], at=values["at"], fill_class=values["fill_class"],
                          host_classes=_as_list(values["host_classes"]),
                          forbidden_classes=_as_list(values["forbidden_classes"]) or (),
                          min_inside_fraction=values["min_inside_fraction"], connectivity=values["connectivity"],
                          label_nc=values["label_nc"])
    op_args = {"move": {"offset_mm": values["offset_mm"]}, "scale": {"factor": values["factor"]}, "remove": {},
               "insert": {"radius_mm": values["radius_mm"], "center_mm": values["center_mm"],
                          "center_vox": values["center_vox"], "shape": values["shape"], "seed": values["seed"],
                          "blob_amplitude": values["blob_amplitude"]}}[op]
    result = edit_label_file(values["in"], values["out"], op, values["class"], overwrite=bool(values["overwrite"]),
                             options=options, **op_args)
    print(f"{values['out']}: {result.summary()}", flush=True)


if __name__ == "__main__":
    main()
