"""Case selection of the augmentation study (`evaluation.augmentation`), pure functions of case ids and file names:
the nested low-data regimes, the synthetic scans matched to their label maps and the real cases those come from,
and the guards that keep validation and test cases out of every training set.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.pairing import SYNTHETIC_STEM, source_stem
from utils.errors import UserError

log = logging.getLogger(__name__)

ALL = "all"
EDITED_STEM = re.compile(r"^(?P<source>.+)_edit(?P<index>\d+)$")


def regime_subsets(train_ids: Sequence[str], regimes: Sequence, seed: int) -> dict[str, list[str]]:
    """{regime: sorted case ids}: the first n of one seeded permutation of the training cases, so the subsets
    are nested; `all` is every training case."""
    ordered = sorted(train_ids)
    order = [ordered[i] for i in np.random.default_rng(int(seed)).permutation(len(ordered))]
    subsets: dict[str, list[str]] = {}
    for regime in regimes:
        if str(regime) == ALL:
            n = len(ordered)
        elif isinstance(regime, (int, np.integer)) and not isinstance(regime, bool) and 1 <= regime <= len(ordered):
            n = int(regime)
        else:
            raise UserError(f"regimes: {regime!r} must be '{ALL}' or a number of cases in 1..{len(ordered)} "
                            "(the training split)")
        if str(regime) in subsets:
            raise UserError(f"regimes: {regime!r} is listed twice")
        subsets[str(regime)] = sorted(order[:n])
    return subsets


def edited_source(stem: str) -> str | None:
    """The case an edited label map `<case>_edit<j>` was made from."""
    match = EDITED_STEM.match(stem)
    return match["source"] if match else None


@dataclass(frozen=True)
class SyntheticScan:
    name: str                # the scan's stem
    scan: Path
    label: Path | None       # its label map; None: the real label map of `source`
    source: str | None       # the real case its label map comes from; None: a generated label map


def match_scans(scans: dict[str, Path], labels: dict[str, Path] | None, kind: str) -> list[SyntheticScan]:
    """Pair scans `<map>_syn<k>` with their label maps. kind "syn": the map is the real case's own
    (`labels` None); "edited": `<case>_edit<j>` maps; "generated": maps that come from no case, the scan also
    named as its map (`ddpm.generate`'s images/ and labels/)."""
    out = []
    for stem, path in scans.items():
        match = SYNTHETIC_STEM.match(stem)
        if match is None and not (kind == "generated" and stem in labels):
            raise UserError(f"{path}: a synthetic scan must be named <label map>_syn<k>.nii.gz"
                            + (" or as its label map" if kind == "generated" else ""))
        if labels is None:
            out.append(SyntheticScan(stem, path, None, match["source"]))
            continue
        map_stem = source_stem(stem, labels)
        if map_stem is None:
            raise UserError(f"{path}: no label map {match['source']}.nii.gz in {next(iter(labels.values())).parent}")
        source = edited_source(map_stem) if kind == "edited" else None
        if kind == "edited" and source is None:
            raise UserError(f"{labels[map_stem]}: an edited label map must be named <case>_edit<j>.nii.gz")
        out.append(SyntheticScan(stem, path, labels[map_stem], source))
    return out


def training_pool(scans: list[SyntheticScan], split: dict[str, list[str]], what: str) -> list[SyntheticScan]:
    """The scans allowed to train: from training cases (or generated maps). A scan whose map comes from a test
    case is an error; those of validation or unknown cases are left out with a note."""
    train, test = set(split["train"]), set(split["test"])
    leaked = [s.name for s in scans if s.source in test]
    if leaked:
        raise UserError(f"{what}: {len(leaked)} scan(s) come from test cases ({', '.join(leaked[:3])}); "
                        "the test split trains nothing")
    kept = [s for s in scans if s.source is None or s.source in train]
    left_out = sorted(s.name for s in scans if s not in kept)
    if left_out:
        log.info("%s: %d scan(s) of non-training cases left out (%s)", what, len(left_out), ", ".join(left_out[:3]))
    return kept


def for_regime(scans: list[SyntheticScan], cases: Sequence[str]) -> list[SyntheticScan]:
    """The scans whose label maps come from the regime's real cases (generated maps: every regime)."""
    allowed = set(cases)
    return [s for s in scans if s.source is None or s.source in allowed]


def check_training_set(real_ids: Sequence[str], scans: Sequence[SyntheticScan], test_ids: Sequence[str]) -> None:
    """Last guard before training: nothing from the test split."""
    test = set(test_ids)
    used = set(real_ids) | {s.source for s in scans if s.source is not None}
    if used & test:
        raise UserError(f"augmentation: a training set holds test case(s) {sorted(used & test)[:3]}")
