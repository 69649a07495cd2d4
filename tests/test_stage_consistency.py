"""Stage 2 trains on stage 1's data: the stage-1 checkpoint stores its split and data settings, stage 2 reuses
the split (whatever was added to the data set or changed in `dataset.split` since) and refuses other data."""
from __future__ import annotations

import json
import logging

import pytest

from dataset.layout import find_cases
from dataset.phantoms import write_phantom_dataset
from dataset.split import check_split, make_split
from ddpm_tiny import TINY_UNET, tiny_vqgan
from utils.checkpoint import dataset_settings
from utils.errors import UserError
from vq_gan_3d.checkpoint import load_vqgan_for_dataset, load_vqgan_with_metadata, save_vqgan

pytestmark = pytest.mark.usefixtures("one_thread")

PHANTOM = ["dataset=nifti", "dataset.label_nc=3", "dataset.modality=mr", "dataset/intensity=percentile",
           "dataset.spacing=[1.0,1.0,2.0]", "dataset.crop_size=[16,16,8]", "dataset.num_workers=0",
           "dataset.name=phantom", "dataset.class_names=[bg,a,b]", "dataset.split.val_fraction=0.2",
           "dataset.split.test_fraction=0.2"]


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=10, shape=(16, 16, 8), spacing=(1.0, 1.0, 2.0), modality="mr")
    return root


def stage2_cfg(compose_cfg, root, run_dir, ckpt, *extra):
    unet = [f"model.diffusion.unet.{k}={list(v) if isinstance(v, list) else v}".replace(" ", "")
            for k, v in TINY_UNET.items() if k != "decoder"]
    return compose_cfg("diffusion", [*PHANTOM, f"dataset.root_dir={root}", f"train.run_dir={run_dir}",
                                     f"model.vqgan_ckpt={ckpt}", *unet, "model.diffusion.timesteps=50", "logger=csv",
                                     *extra])


def stage1_checkpoint(path, dataset_cfg, split=None, dataset=True):
    """A stage-1 file as training writes it: the data settings and the split of `dataset_cfg`'s cases."""
    if split is None:
        split = make_split(find_cases(dataset_cfg), dataset_cfg.split)
    return save_vqgan(tiny_vqgan(), path, dataset=dataset_settings(dataset_cfg) if dataset else None,
                      split=split), split


def test_checkpoint_round_trips_split_and_data_settings(compose_cfg, data_root, tmp_path):
    cfg = stage2_cfg(compose_cfg, data_root, tmp_path / "run", "unused")
    path, split = stage1_checkpoint(tmp_path / "vqgan.ckpt", cfg.dataset)
    _, meta = load_vqgan_with_metadata(path)
    assert meta["split"] == split and sorted(sum(split.values(), [])) == [f"case{i:03d}" for i in range(10)]
    assert meta["dataset"] == {"name": "phantom", "modality": "mr", "label_nc": 3, "class_names": ["bg", "a", "b"],
                               "spacing": [1.0, 1.0, 2.0], "crop_size": [16, 16, 8],
                               "intensity": {"kind": "percentile", "lower": 0.5, "upper": 99.5, "headroom": 0.3}}


@pytest.mark.parametrize("override, message", [
    ("dataset.name=other", "name 'phantom' in the stage-1 checkpoint, 'other' in the dataset config"),
    ("dataset.spacing=[2.0,2.0,2.0]", "spacing [1.0, 1.0, 2.0] in the stage-1 checkpoint, [2.0, 2.0, 2.0] in the "
                                      "dataset config"),
    ("dataset.intensity.upper=99.0", "intensity {'kind': 'percentile', 'lower': 0.5, 'upper': 99.5, 'headroom': "
                                     "0.3} in the stage-1 checkpoint, {'kind': 'percentile', 'lower': 0.5, "
                                     "'upper': 99.0, 'headroom': 0.3}"),
    ("dataset.modality=ct", "modality 'mr' in the stage-1 checkpoint, 'ct' in the dataset config"),
    ("dataset.label_nc=4", "label_nc 3 in the stage-1 checkpoint, 4 in the dataset config"),
    ("dataset.class_names=[bg,b,a]", "label classes ['bg', 'a', 'b'] in the stage-1 checkpoint, ['bg', 'b', 'a']"),
])
def test_stage2_refuses_other_data_naming_both_values(compose_cfg, data_root, tmp_path, override, message):
    from train.lit_diffusion import LitDiffusion

    trained = stage2_cfg(compose_cfg, data_root, tmp_path / "run", "unused")
    ckpt, _ = stage1_checkpoint(tmp_path / "vqgan.ckpt", trained.dataset)
    with pytest.raises(UserError) as err:
        LitDiffusion(stage2_cfg(compose_cfg, data_root, tmp_path / "run", ckpt, override))
    text = str(err.value)
    assert text.startswith(f"model.vqgan_ckpt={ckpt}: ") and message in text and "\n" not in text


def test_settings_that_may_differ_are_accepted(compose_cfg, data_root, tmp_path):
    trained = stage2_cfg(compose_cfg, data_root, tmp_path / "run", "unused")
    ckpt, split = stage1_checkpoint(tmp_path / "vqgan.ckpt", trained.dataset)
    other_crop = stage2_cfg(compose_cfg, data_root, tmp_path / "run", ckpt, "dataset.crop_size=[8,8,8]",
                            "dataset.class_names=null")
    _, reused = load_vqgan_for_dataset(ckpt, other_crop.dataset, "model.vqgan_ckpt")
    assert reused == split


def _stage2_datamodule(cfg):
    from train.lit_diffusion import LitDiffusion
    from train.train_diffusion import build_datamodule

    datamodule = build_datamodule(cfg, LitDiffusion(cfg))
    datamodule.setup("fit")
    return datamodule


@pytest.mark.parametrize("added, seed", [(True, 0), (False, 7), (True, 7)], ids=["case-added", "seed", "both"])
def test_split_is_reused_when_a_case_is_added_or_split_seed_changes(compose_cfg, data_root, tmp_path, caplog,
                                                                     added, seed):
    trained = stage2_cfg(compose_cfg, data_root, tmp_path / "run", "unused")
    ckpt, split = stage1_checkpoint(tmp_path / "vqgan.ckpt", trained.dataset)
    if added:
        write_phantom_dataset(data_root, case_ids=["case100", "case101"], shape=(16, 16, 8),
                              spacing=(1.0, 1.0, 2.0), modality="mr", seed=3)
    cfg = stage2_cfg(compose_cfg, data_root, tmp_path / "run", ckpt, f"dataset.split.seed={seed}")
    assert make_split(find_cases(cfg.dataset), cfg.dataset.split) != split  # splitting again would move cases
    with caplog.at_level(logging.WARNING):
        datamodule = _stage2_datamodule(cfg)
    assert datamodule.split == split
    assert json.loads((tmp_path / "run" / "split.json").read_text()) == split
    assert [c.case_id for c in datamodule.train_cases] == split["train"]
    assert [c.case_id for c in datamodule.val_cases] == split["val"]
    assert [c.case_id for c in datamodule.test_cases()] == split["test"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 case(s) are not in the stored split" in m and "case100, case101" in m for m in warned) == added


def test_a_stored_case_missing_from_the_data_set_is_refused(compose_cfg, data_root, tmp_path):
    trained = stage2_cfg(compose_cfg, data_root, tmp_path / "run", "unused")
    split = make_split(find_cases(trained.dataset), trained.dataset.split)
    split["test"] = [*split["test"], "ghost7"]
    ckpt, _ = stage1_checkpoint(tmp_path / "vqgan.ckpt", trained.dataset, split=split)
    with pytest.raises(UserError, match=r"^model\.vqgan_ckpt=.*: 1 case\(s\) of the stored split are not in the "
                                        r"data set \(ghost7\)"):
        _stage2_datamodule(stage2_cfg(compose_cfg, data_root, tmp_path / "run", ckpt))
    assert not (tmp_path / "run" / "split.json").exists()


def test_old_checkpoint_without_split_falls_back_with_a_warning(compose_cfg, data_root, tmp_path, caplog):
    trained = stage2_cfg(compose_cfg, data_root, tmp_path / "run", "unused")
    old_dir = tmp_path / "old_run"
    ckpt = save_vqgan(tiny_vqgan(), old_dir / "last.ckpt", dataset=dataset_settings(trained.dataset))
    with caplog.at_level(logging.WARNING):
        _, split = load_vqgan_for_dataset(ckpt, trained.dataset, "model.vqgan_ckpt")
    assert split is None and any("recomputed from dataset.split" in r.getMessage() for r in caplog.records)
    # The old run's split.json, next to its checkpoint, is the split stage 1 trained on.
    stage1_split = {"train": ["case000", "case001"], "val": ["case002"], "test": ["case003"]}
    (old_dir / "split.json").write_text(json.dumps(stage1_split))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, split = load_vqgan_for_dataset(ckpt, trained.dataset, "model.vqgan_ckpt")
    assert split == stage1_split and any(str(old_dir / "split.json") in r.getMessage() for r in caplog.records)


def test_a_stored_split_listing_a_case_twice_is_refused():
    with pytest.raises(UserError, match="stored: split lists cases more than once \\(a\\)"):
        check_split({"train": ["a", "b"], "val": ["a"], "test": []}, "stored")
    with pytest.raises(UserError, match="stored: split must hold train, val and test lists"):
        check_split({"train": ["a"]}, "stored")

