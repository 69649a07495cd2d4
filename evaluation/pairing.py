"""Find NIfTI volumes in folders and pair synthetic volumes with real ones by file stem.

A synthetic file pairs with the real file of the same stem, or of stem `<real stem>_syn<k>` (k-th sample from
the same label map). Label maps pair with real images by stem; an nnU-Net image stem `<case>_0000` also finds
the label `<case>`. Comparing a folder with itself, or two folders holding byte-identical files, is refused.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SYNTHETIC_STEM = re.compile(r"^(?P<source>.+)_syn(?P<index>\d+)$")
NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_\d{4}$")


def nifti_stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{path}: not a NIfTI file name")


def list_nifti(folder: str | os.PathLike, role: str) -> dict[str, Path]:
    """stem -> path for every .nii/.nii.gz file directly in `folder` (sorted by stem)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {role} folder does not exist")
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith("."):
            stem = nifti_stem(path)
            if stem in files:
                raise UserError(f"{path}: two {role} files share the stem '{stem}' ({files[stem].name})")
            files[stem] = path
    if not files:
        raise UserError(f"{folder}: no .nii or .nii.gz files in the {role} folder")
    return dict(sorted(files.items()))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_same_data(real_dir: str | os.PathLike, fake_dir: str | os.PathLike,
                     real: dict[str, Path], fake: dict[str, Path], real_role: str = "real") -> None:
    """UserError when the real and fake folders are one folder or hold byte-identical sets of files."""
    if Path(real_dir).resolve() == Path(fake_dir).resolve() or os.path.samefile(real_dir, fake_dir):
        raise UserError(f"{fake_dir}: {real_role} and fake are the same folder; this would compare a set with itself")
    if len(real) == len(fake):
        real_sizes = Counter(p.stat().st_size for p in real.values())
        fake_sizes = Counter(p.stat().st_size for p in fake.values())
        if real_sizes == fake_sizes:
            real_digests = Counter(file_digest(p) for p in real.values())
            if real_digests == Counter(file_digest(p) for p in fake.values()):
                raise UserError(
                    f"{fake_dir}: holds byte-identical copies of the files in {real_dir}; "
                    "this would compare a set with itself"
                )


def source_stem(fake_stem: str, real_stems) -> str | None:
    """The real stem a synthetic stem belongs to: itself, or `<real>` for `<real>_syn<k>`; None if unpaired."""
    if fake_stem in real_stems:
        return fake_stem
    match = SYNTHETIC_STEM.match(fake_stem)
    if match and match["source"] in real_stems:
        return match["source"]
    return None


def label_for(real_stem: str, labels: dict[str, Path]) -> Path | None:
    if real_stem in labels:
        return labels[real_stem]
    match = NNUNET_CHANNEL.match(real_stem)
    return labels.get(match["case"]) if match else None


@dataclass
class Pairing:
    real: dict[str, Path]
    fake: dict[str, Path]
    labels: dict[str, Path]                                   # real stem -> label map
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (real stem, fake stem)
    unpaired_fake: list[str] = field(default_factory=list)

    def samples_by_source(self) -> dict[str, list[str]]:
        """real stem -> the fake stems generated from its label map."""
        groups: dict[str, list[str]] = {}
        for real_stem, fake_stem in self.pairs:
            groups.setdefault(real_stem, []).append(fake_stem)
        return groups


def pair_folders(real_dir: str | os.PathLike, fake_dir: str | os.PathLike,
                 labels_dir: str | os.PathLike | None = None) -> Pairing:
    real = list_nifti(real_dir, "real")
    fake = list_nifti(fake_dir, "fake")
    refuse_same_data(real_dir, fake_dir, real, fake)
    labels: dict[str, Path] = {}
    if labels_dir is not None:
        all_labels = list_nifti(labels_dir, "labels")
        for stem in real:
            path = label_for(stem, all_labels)
            if path is None:
                raise UserError(f"{labels_dir}: no label map for real volume '{stem}'")
            labels[stem] = path
    pairing = Pairing(real=real, fake=fake, labels=labels)
    for fake_stem in fake:
        real_stem = source_stem(fake_stem, real)
        if real_stem is None:
            pairing.unpaired_fake.append(fake_stem)
        else:
            pairing.pairs.append((real_stem, fake_stem))
    return pairing
