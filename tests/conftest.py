"""Shared fixtures: an isolated cache, config composition, tiny phantom and demo data sets.

Everything here is session-scoped and small (a few 24x24x16 phantoms, a 6-subject demo at 6 mm) so any test
module can use real data without paying for it more than once.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from utils.paths import CONFIG_DIR  # noqa: E402


def compose(config_name: str = "check", overrides: list[str] | None = None) -> DictConfig:
    """Compose a real top-level config with Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


@pytest.fixture(scope="session")
def compose_cfg():
    """`compose_cfg(config_name="check", overrides=[...]) -> DictConfig`."""
    return compose


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Point $XDG_CACHE_HOME at a session temp folder: tests never write the project's .cache."""
    folder = tmp_path_factory.mktemp("xdg_cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """images_labels phantom data set: 6 MR cases `case000`..`case005`, 24x24x16 at 1x1x2 mm, 3 classes."""
    from dataset.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom_data")
    write_phantom_dataset(root, n_cases=6, shape=(24, 24, 16), spacing=(1.0, 1.0, 2.0), label_nc=3, modality="mr")
    return root


@pytest.fixture(scope="session")
def phantom_cfg(phantom_root) -> DictConfig:
    """`cfg.dataset` (the nifti config) for `phantom_root`: crops 16x16x8, batch 2, no workers."""
    cfg = compose("check", [
        "dataset=nifti", f"dataset.root_dir={phantom_root}", "dataset.label_nc=3", "dataset.modality=mr",
        "dataset/intensity=percentile", "dataset.spacing=[1.0,1.0,2.0]", "dataset.crop_size=[16,16,8]",
        "dataset.num_workers=0", "dataset.name=phantom",
    ])
    return cfg.dataset


@pytest.fixture(scope="session")
def demo_cfg() -> DictConfig:
    """`cfg.dataset` of a tiny demo data set (6 subjects at 6 mm, 33x39x32 voxels, crops 32x32x16), built once
    into the session cache."""
    cfg = compose("check", ["dataset=demo", "dataset.demo.n_subjects=6", "dataset.spacing=[6.0,6.0,6.0]",
                            "dataset.crop_size=[32,32,16]"]).dataset
    from dataset.demo import ensure_demo_dataset

    ensure_demo_dataset(cfg)
    return cfg


def _edited(cfg: DictConfig, changes: dict) -> DictConfig:
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, value in changes.items():
        OmegaConf.update(new, key, value, merge=False)
    return new


@pytest.fixture(scope="session")
def edit_cfg():
    """`edit_cfg(cfg, {"dotted.key": value, ...}) -> DictConfig`: an edited copy (the original is untouched)."""
    return _edited


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread (no OpenMP synchronisation between two workers per op), and
    one thread is immune to other processes holding the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
