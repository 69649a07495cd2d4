import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from dataset import cache
from dataset.augment import build_augmentation
from dataset.crops import center_crop, draw_centre, pad_to_multiple, sample_crop, unpad
from dataset.datamodule import VolumeDataModule, split_cases
from utils.errors import UserError


@pytest.fixture(scope="module")
def phantom_module(phantom_cfg, tmp_path_factory):
    module = VolumeDataModule(phantom_cfg, tmp_path_factory.mktemp("run"))
    module.setup("fit")
    return module


def test_batches_follow_the_contract(phantom_module):
    batch = next(iter(phantom_module.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 1, 16, 16, 8) and batch["label"].dtype == torch.int64
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert 0 <= batch["label"].min() and batch["label"].max() < 3
    assert set(batch["case_id"]) <= set(phantom_module.split["train"])
    seen = {c for b in phantom_module.val_dataloader() for c in b["case_id"]}
    assert seen == set(phantom_module.split["val"]) and len(seen) >= 1


def test_ids_only_reaches_the_loaders_running_workers(phantom_cfg, tmp_path):
    module = VolumeDataModule(phantom_cfg, tmp_path)
    module.setup("fit")
    dataset = module.train_set
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, persistent_workers=True)
    first = next(iter(loader))
    assert set(first) == {"image", "label", "case_id"}
    dataset.serve_ids_only()  # after the worker started: the flag is shared memory
    batches = list(loader)
    assert all(set(b) == {"case_id"} for b in batches)
    assert sorted(c for b in batches for c in b["case_id"]) == sorted(module.split["train"])


def test_validation_crops_are_deterministic(phantom_module):
    first = [b["image"] for b in phantom_module.val_dataloader()]
    second = [b["image"] for b in phantom_module.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_split_is_written_and_the_test_split_is_never_loaded(phantom_module, phantom_cfg, monkeypatch):
    split = json.loads((phantom_module.run_dir / "split.json").read_text())
    assert split == phantom_module.split
    assert {c.case_id for c in phantom_module.test_cases()} == set(split["test"]) and split["test"]
    assert not any(cache.entry_folder(c, phantom_cfg).exists() for c in phantom_module.test_cases())
    assert {name: [c.case_id for c in cases] for name, cases in split_cases(phantom_cfg).items()} == split
    reads = []
    monkeypatch.setattr("dataset.validate_case.load_nifti", lambda path: reads.append(path))
    ids = {c for loader in (phantom_module.train_dataloader(), phantom_module.val_dataloader())
           for b in loader for c in b["case_id"]}
    assert reads == [] and not ids & set(split["test"])


def test_reference_intensity_params_are_the_training_median(phantom_module, phantom_cfg):
    params = [cache.load_preprocessed(c, phantom_cfg).intensity_params for c in phantom_module.train_cases]
    reference = phantom_module.reference_intensity_params()
    assert reference["high"] == pytest.approx(np.median([p["high"] for p in params]))
    normalizer = phantom_module.normalizer()
    # the upper percentile maps to 1 - 2 x headroom; 1 is 1 / (1 - headroom) of the span above the lower one
    assert normalizer.inverse(torch.full((1,), normalizer.top)).item() == pytest.approx(reference["high"], rel=1e-5)
    span = (reference["high"] - reference["low"]) / (1 - normalizer.headroom)
    assert normalizer.inverse(torch.ones(1)).item() == pytest.approx(reference["low"] + span, rel=1e-5)


def test_small_volumes_are_padded_with_minus_one_and_background(phantom_cfg, edit_cfg, tmp_path):
    module = VolumeDataModule(edit_cfg(phantom_cfg, {"crop_size": [28, 24, 20]}), tmp_path / "run")
    module.setup("fit")
    batch = next(iter(module.val_dataloader()))
    assert batch["image"].shape[-3:] == (28, 24, 20)
    assert torch.all(batch["image"][..., :2, :, :] == -1) and torch.all(batch["image"][..., :, :, :2] == -1)
    assert torch.all(batch["label"][..., -2:] == 0)


def test_foreground_crops_are_centred_on_foreground():
    image = np.zeros((40, 40, 20), np.float32)
    label = np.zeros((40, 40, 20), np.int64)
    label[25, 12, 9] = 2
    foreground = np.argwhere(label > 0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        centre = draw_centre(foreground, {}, foreground_prob=1.0, generator=generator)
        _, crop = sample_crop(image, label, (8, 8, 4), centre=centre, generator=generator)
        assert crop[4, 4, 2] == 2
    assert draw_centre(foreground, {}, foreground_prob=0.0, generator=generator) is None
    hits = sum(sample_crop(image, label, (8, 8, 4), generator=generator)[1].any() for _ in range(50))
    assert hits < 25  # uniform crops rarely contain one voxel
    image_crop, label_crop = center_crop(image[:6], label[:6], (8, 8, 4))
    assert image_crop.shape == (8, 8, 4) and image_crop[0].min() == -1 and label_crop[0].max() == 0


def test_lesion_crops_are_centred_on_a_lesion_at_the_configured_rate():
    """Class 3 (the lesion) is one voxel among 400 foreground voxels: centred crops find it at lesion_prob, a case
    without it falls back to foreground crops, and the rate is near the configured one."""
    foreground = np.argwhere(np.ones((20, 20, 1), bool))
    lesion = np.array([[7, 3, 0]], dtype=np.int32)
    locations = {1: foreground, 3: lesion}
    generator = torch.Generator().manual_seed(1)
    draws = [draw_centre(foreground, locations, foreground_prob=1.0, class_prob=0.3, classes=(3,),
                         generator=generator) for _ in range(2000)]
    share = np.mean([c is not None and tuple(c) == (7, 3, 0) for c in draws])
    assert abs(share - 0.3) < 0.04 and all(c is not None for c in draws)
    without = [draw_centre(foreground, {1: foreground}, foreground_prob=0.0, class_prob=1.0, classes=(3,),
                           generator=generator) for _ in range(20)]
    assert without == [None] * 20  # no lesion in the case, no foreground crops asked: uniform


def test_training_crops_hold_the_lesion_at_the_configured_rate(demo_cfg, edit_cfg, tmp_path):
    """The demo's data module (lesion_crop_prob from its config) gives crops holding lesion voxels far more
    often than foreground crops do, and the preprocessing cache stores each class's voxel coordinates."""
    lesion = demo_cfg.class_names.index("lesion")
    rates = {}
    for prob in (0.0, 1.0):
        module = VolumeDataModule(edit_cfg(demo_cfg, {"lesion_crop_prob": prob, "crop_size": [8, 8, 8]}),
                                  tmp_path / f"run{prob}")
        module.setup("fit")
        holders = [i for i, e in enumerate(module.train_set.entries) if lesion in cache.read_entry(e).class_locations]
        assert holders  # the tiny demo has lesions in its training cases
        torch.manual_seed(0)
        rates[prob] = np.mean([bool((module.train_set[i]["label"] == lesion).any()) for i in holders * 10])
        entry = cache.read_entry(module.train_set.entries[holders[0]])
        coords = entry.class_locations[lesion]
        assert (np.asarray(entry.label)[tuple(coords.T)] == lesion).all()
    assert rates[1.0] == 1.0 and rates[0.0] < 0.7
    with pytest.raises(UserError, match="lesion_crop_prob"):
        VolumeDataModule(edit_cfg(demo_cfg, {"lesion_crop_prob": 1.5}), tmp_path / "bad").setup("fit")


def test_pad_to_multiple_and_unpad_round_trip():
    volume = np.random.default_rng(0).normal(size=(13, 10, 7))
    padded, pads = pad_to_multiple(volume, 4, value=-1.0)
    assert padded.shape == (16, 12, 8) and padded[-1].max() == -1
    np.testing.assert_array_equal(unpad(torch.from_numpy(padded)[None, None], pads)[0, 0].numpy(), volume)


def test_augmentations_keep_labels_integer_and_flip_only_configured_axes():
    grid = np.indices((16, 16, 8)).sum(0)
    image = torch.from_numpy((grid / grid.max() * 2 - 1).astype(np.float32))
    label = torch.from_numpy((grid % 3).astype(np.int64))
    augment = build_augmentation({"flip_axes": [], "affine_prob": 1.0, "rotation_deg": 10.0, "scale_range": 0.1,
                                  "gamma_prob": 1.0}, spacing=(1.0, 1.0, 2.0))
    torch.manual_seed(0)
    out_image, out_label = augment(image, label)
    assert out_label.dtype == torch.int64 and set(out_label.unique().tolist()) <= {0, 1, 2}
    assert out_image.shape == image.shape and out_image.min() >= -1 and out_image.max() <= 1
    assert not torch.equal(out_label, label)
    flip = build_augmentation({"flip_axes": [1], "affine_prob": 0.0, "rotation_deg": 0.0, "scale_range": 0.0,
                               "gamma_prob": 0.0}, spacing=(1.0, 1.0, 1.0))
    outcomes = set()
    for _ in range(12):
        flipped_image, flipped_label = flip(image, label)
        if torch.equal(flipped_image, image.flip(1)) and torch.equal(flipped_label, label.flip(1)):
            outcomes.add("flipped")
        else:
            outcomes.add("same" if torch.equal(flipped_image, image) else "other")
    assert outcomes == {"flipped", "same"}
    assert build_augmentation({"flip_axes": [], "affine_prob": 0.0, "rotation_deg": 0.0, "scale_range": 0.0,
                               "gamma_prob": 0.0}, spacing=(1.0, 1.0, 1.0)) is None


class _MeanModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.seen: set[str] = set()

    def training_step(self, batch, _):
        self.seen.update(batch["case_id"])
        return ((batch["image"] - self.bias) ** 2).mean()

    def validation_step(self, batch, _):
        self.seen.update(batch["case_id"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_demo_data_module_runs_under_a_lightning_trainer(demo_cfg, tmp_path):
    module = VolumeDataModule(demo_cfg, tmp_path / "run")
    model = _MeanModel()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=module)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert model.seen == set(split["train"]) | set(split["val"])
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32, 16) and int(batch["label"].max()) <= 4


def test_first_use_preprocesses_in_parallel_worker_processes(phantom_cfg, edit_cfg, tmp_path, monkeypatch):
    cfg = edit_cfg(phantom_cfg, {"num_workers": 2, "cache_dir": str(tmp_path / "cache")})
    module = VolumeDataModule(cfg, None)
    calls = []
    monkeypatch.setattr(cache, "preprocess_case", lambda *args: calls.append(args))  # not used in this process
    module.prepare_data()
    assert calls == []
    cases = module.train_cases + module.val_cases
    assert all(cache.entry_folder(c, cfg).is_dir() for c in cases)
    assert not any(cache.entry_folder(c, cfg).exists() for c in module.test_cases())
