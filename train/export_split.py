"""Link the cases of one split of a training run (the held-out test cases by default) into a folder pair that the
synthesis and evaluation CLIs read: `<out>/images/<case>.nii[.gz]` and `<out>/labels/<case>.nii[.gz]`.

    python -m train.export_split run_dir=runs/diffusion-duke-1234 out=runs/eval-duke

The data set and the split come from the run itself (`.hydra/config.yaml`, `split.json`), so the cases are the
ones that run never trained on. Links, not copies: nothing of the data is duplicated.
"""
from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dataset.io import strip_nifti_suffix
from dataset.layout import find_cases
from dataset.split import SPLITS, read_split, select
from utils.errors import UserError, exit_on_user_error


def nifti_suffix(path: Path) -> str:
    return path.name[len(strip_nifti_suffix(path.name)):]


def link_split(run_dir: Path, out: Path, split: str = "test", overwrite: bool = False) -> list[str]:
    """Create the links; returns the case ids."""
    if split not in SPLITS:
        raise UserError(f"split={split}: use one of {', '.join(SPLITS)}")
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{config_file}: not found; run_dir must be a training run directory")
    dataset_cfg = OmegaConf.load(config_file).dataset
    cases = select(find_cases(dataset_cfg), read_split(run_dir / "split.json"), split)
    if not cases:
        raise UserError(f"{run_dir / 'split.json'}: the {split} split is empty")
    for case in cases:
        for kind, source in (("images", case.image_path), ("labels", case.label_path)):
            link = out / kind / f"{case.case_id}{nifti_suffix(source)}"
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if not overwrite:
                    raise UserError(f"{link}: already exists; pass overwrite=true to replace it")
                link.unlink()
            os.symlink(source.resolve(), link)
    return [case.case_id for case in cases]


@hydra.main(version_base="1.3", config_path="../config", config_name="export_split")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    ids = link_split(Path(cfg.run_dir), Path(cfg.out), split=cfg.split, overwrite=bool(cfg.overwrite))
    print(f"{len(ids)} {cfg.split} case(s) linked into {cfg.out}/images and {cfg.out}/labels")


if __name__ == "__main__":
    main()
