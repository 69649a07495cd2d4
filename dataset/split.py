"""Deterministic patient-level train/val/test split.

Patients (not cases) are shuffled with the configured seed and cut by the configured fractions, so every case
of a patient lands in the same split. The split is written as `split.json` into the run directory; a run
directory that already holds a different split is refused, so a resumed run never trains on its test cases.
Stage 1 stores its split in its checkpoint and stage 2 reuses it (`reuse_split`) instead of splitting again, so
a case added or a `split.seed` changed between the stages cannot move stage-2 test cases into stage-1 training.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dataset.layout import Case
from utils.atomic import atomic_path
from utils.errors import UserError

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def split_sizes(n_patients: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) patient counts; at least one val (and test, if asked for) once there are 3 patients."""
    n_val = int(round(n_patients * val_fraction))
    n_test = int(round(n_patients * test_fraction))
    if n_patients >= 3:
        n_val = max(1, n_val)
        n_test = max(1, n_test) if test_fraction > 0 else n_test
    while n_val + n_test > n_patients - 1 and n_val + n_test > 0:  # keep at least one training patient
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_patients - n_val - n_test, n_val, n_test


def make_split(cases: Sequence[Case], split_cfg: Mapping) -> dict[str, list[str]]:
    """`{"train": [...], "val": [...], "test": [...]}` of case ids, no patient in two splits."""
    val_fraction, test_fraction = float(split_cfg["val_fraction"]), float(split_cfg["test_fraction"])
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise UserError(f"dataset.split: need val_fraction, test_fraction >= 0 with a sum below 1, "
                        f"got {val_fraction} and {test_fraction}")
    patients = sorted({case.patient_id for case in cases})
    order = np.random.default_rng(int(split_cfg["seed"])).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    n_train, n_val, _ = split_sizes(len(patients), val_fraction, test_fraction)
    split_of = {}
    for index, patient in enumerate(shuffled):
        split_of[patient] = "train" if index < n_train else "val" if index < n_train + n_val else "test"
    result: dict[str, list[str]] = {name: [] for name in SPLITS}
    for case in sorted(cases, key=lambda c: c.case_id):
        result[split_of[case.patient_id]].append(case.case_id)
    return result


def write_split(split: Mapping[str, Sequence[str]], run_dir: str | os.PathLike) -> Path:
    """Write `run_dir/split.json` atomically; an identical existing file is kept, a different one refused."""
    path = Path(run_dir) / "split.json"
    content = {name: list(split[name]) for name in SPLITS}
    if path.exists():
        if read_split(path) == content:
            return path
        raise UserError(f"{path}: this run directory holds a different split than the current data set gives; "
                        "use a new run directory or remove the old split.json")
    with atomic_path(path, overwrite=False) as tmp:
        tmp.write_text(json.dumps(content, indent=1) + "\n")
    return path


def read_split(path: str | os.PathLike) -> dict[str, list[str]]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable split file ({err})") from None
    return check_split(data, str(path))


def check_split(data, source: str) -> dict[str, list[str]]:
    """`data` as a split (train, val and test lists of case ids, no case in two of them); `source` names it."""
    if not isinstance(data, Mapping) or any(not isinstance(data.get(name), (list, tuple)) for name in SPLITS):
        raise UserError(f"{source}: split must hold train, val and test lists")
    split = {name: [str(c) for c in data[name]] for name in SPLITS}
    ids = [c for name in SPLITS for c in split[name]]
    if len(set(ids)) != len(ids):
        twice = sorted({c for c in ids if ids.count(c) > 1})
        raise UserError(f"{source}: split lists cases more than once ({_some(twice)})")
    return split


def reuse_split(split: Mapping[str, Sequence[str]], cases: Sequence[Case], source: str) -> dict[str, list[str]]:
    """A split made earlier (stage 1's) applied to the cases found now. A case it lists that is gone is a
    `UserError` (the data set is not the one it was made on); a case it does not list is left out of every split
    with a logged warning, never added to training."""
    found = {case.case_id for case in cases}
    missing = sorted(c for name in SPLITS for c in split[name] if c not in found)
    if missing:
        raise UserError(f"{source}: {len(missing)} case(s) of the stored split are not in the data set "
                        f"({_some(missing)}); point dataset.root_dir at the data the checkpoint was trained on")
    listed = {c for name in SPLITS for c in split[name]}
    new = sorted(found - listed)
    if new:
        log.warning("%s: %d case(s) are not in the stored split and are left out of train, val and test (%s)",
                    source, len(new), _some(new))
    return {name: list(split[name]) for name in SPLITS}


def split_for(cases: Sequence[Case], split_cfg: Mapping, stored: Mapping[str, Sequence[str]] | None = None,
              source: str = "split") -> dict[str, list[str]]:
    """`stored` (a split made earlier, named by `source`) reused on `cases`, or a fresh `make_split`."""
    return reuse_split(stored, cases, source) if stored is not None else make_split(cases, split_cfg)


def _some(ids: Sequence[str], n: int = 3) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def select(cases: Sequence[Case], split: Mapping[str, Sequence[str]], name: str) -> list[Case]:
    wanted = set(split[name])
    return [case for case in cases if case.case_id in wanted]
