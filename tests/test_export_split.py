"""train.export_split: the held-out cases of a run linked as images/ + labels/ for ddpm.sample and evaluation."""
import json

import pytest
from omegaconf import OmegaConf

from dataset.layout import find_cases
from dataset.split import make_split, write_split
from train.export_split import link_split
from utils.errors import UserError


@pytest.fixture
def run_dir(tmp_path, phantom_cfg):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"dataset": phantom_cfg}), run / ".hydra" / "config.yaml")
    write_split(make_split(find_cases(phantom_cfg), {"val_fraction": 0.2, "test_fraction": 0.4, "seed": 0}), run)
    return run


def test_links_the_test_cases_of_the_run(run_dir, tmp_path, phantom_cfg):
    out = tmp_path / "eval"
    ids = link_split(run_dir, out)
    expected = json.loads((run_dir / "split.json").read_text())["test"]
    assert sorted(ids) == sorted(expected) and len(ids) == 2
    cases = {case.case_id: case for case in find_cases(phantom_cfg)}
    for case_id in ids:
        image, label = out / "images" / f"{case_id}.nii.gz", out / "labels" / f"{case_id}.nii.gz"
        assert image.resolve() == cases[case_id].image_path.resolve()
        assert label.resolve() == cases[case_id].label_path.resolve()
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(f"{i}.nii.gz" for i in ids)


def test_other_splits_existing_links_and_bad_input(run_dir, tmp_path):
    out = tmp_path / "eval"
    assert len(link_split(run_dir, out, split="train")) >= 1
    with pytest.raises(UserError, match="already exists"):
        link_split(run_dir, out, split="train")
    link_split(run_dir, out, split="train", overwrite=True)
    with pytest.raises(UserError, match="split=holdout"):
        link_split(run_dir, out, split="holdout")
    with pytest.raises(UserError, match="config.yaml"):
        link_split(tmp_path / "not-a-run", out)
