"""The real data-set configs, composed with Hydra, on phantoms laid out and named like each real data set.
Only the data folder and things that merely make the test small (crop size, workers) are overridden."""
import pytest

from dataset.datamodule import VolumeDataModule
from dataset.phantoms import write_phantom_dataset
from dataset.validate import validate_dataset

LAYOUTS = {
    # AutoPET: nnU-Net layout, CT = _0000 and PET = _0001, two studies of one patient (same hash, other date)
    "autopet": dict(layout="nnunet", n_channels=2, modality="ct", spacing=(2.0, 2.0, 3.0), label_nc=37,
                    case_ids=["fdg_0a1b2c3d4e_05-02-2002", "fdg_0a1b2c3d4e_11-08-2003", "fdg_77aa01bc9f_01-01-2001",
                              "psma_1f2e3d4c5b_03-04-2019", "PETCT_9e8d7c6b5a_07-07-2007"]),
    "synthrad2023": dict(layout="images_labels", modality="ct", spacing=(1.0, 1.0, 2.5), label_nc=31,
                         case_ids=["1BA001", "1BA005", "1PA004", "2BC010", "2PC017"]),
    "duke": dict(layout="images_labels", modality="mr", spacing=(1.0, 1.0, 2.0), label_nc=3,
                 case_ids=[f"Breast_MRI_{i:03d}" for i in (1, 2, 7, 19, 120)]),
    "nifti": dict(layout="images_labels", modality="ct", spacing=(1.5, 1.5, 3.0), label_nc=4,
                  case_ids=["anything", "goes", "here", "as", "names"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_real_config_runs_on_a_phantom_laid_out_like_its_data_set(name, tmp_path, compose_cfg):
    layout = dict(LAYOUTS[name])
    write_phantom_dataset(tmp_path / "data", shape=(24, 24, 16), orientation="LPS", **layout)
    overrides = [f"dataset={name}", f"dataset.root_dir={tmp_path / 'data'}", "dataset.crop_size=[16,16,8]",
                 "dataset.num_workers=0"]
    if name == "nifti":
        overrides.append(f"dataset.label_nc={layout['label_nc']}")
    cfg = compose_cfg("check", overrides).dataset
    assert cfg.label_nc == layout["label_nc"] and cfg.modality == layout["modality"]

    summary = validate_dataset(cfg)
    assert [c.case_id for c in summary.cases] == sorted(layout["case_ids"])
    if name == "autopet":
        patient_of = {c.case_id: c.patient_id for c in summary.cases}
        assert patient_of["fdg_0a1b2c3d4e_05-02-2002"] == patient_of["fdg_0a1b2c3d4e_11-08-2003"] == "fdg_0a1b2c3d4e"
        assert len(summary.patients) == 4
        assert all(c.image_path.name.endswith("_0000.nii.gz") for c in summary.cases)

    module = VolumeDataModule(cfg, tmp_path / "run")
    module.setup("fit")
    split = module.split
    for patient in summary.patients:  # one patient, one split
        studies = {c.case_id for c in summary.cases if c.patient_id == patient}
        assert sum(bool(studies & set(ids)) for ids in split.values()) == 1
    assert len(split["val"]) >= 1 and len(split["test"]) >= 1
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 8) and batch["label"].max() < cfg.label_nc
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    params = module.reference_intensity_params()
    if layout["modality"] == "ct":
        assert (params["low"], params["high"]) == (cfg.intensity.hu_min, cfg.intensity.hu_max)
    else:
        assert params["kind"] == "percentile" and params["high"] > params["low"]
