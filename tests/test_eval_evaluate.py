"""The evaluate tool end to end on small phantom NIfTI folders."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from dataset.io import save_nifti
from dataset.phantoms import phantom_affine, phantom_volume
from evaluation.evaluate import run
from utils.errors import UserError
from utils.paths import CONFIG_DIR, PROJECT_ROOT

SHAPE = (24, 24, 16)
NOISE_HU = 40.0


class PooledLinear(torch.nn.Module):
    """Stand-in for Inception: a fixed linear map of 2x2 average-pooled RGB (12 -> 6 features)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("matrix", torch.linspace(-1, 1, 72).reshape(12, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) @ self.matrix


class MeanAbs(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    affine = phantom_affine((2.0, 2.0, 3.0), orientation="LPS")
    for i in range(3):
        image, label = phantom_volume(SHAPE, 3, "ct", seed=i)
        save_nifti(image, affine, root / "real" / f"case{i}.nii.gz")
        save_nifti(label, affine, root / "labels" / f"case{i}.nii.gz")
        for k in range(2 if i < 2 else 1):
            fake = image.astype(np.float32) + rng.normal(0, NOISE_HU, SHAPE).astype(np.float32)
            save_nifti(fake, affine, root / "fake" / f"case{i}_syn{k}.nii.gz")
        save_nifti(image.astype(np.float32), affine, root / "same" / f"case{i}.nii.gz")  # same values, not bytes
    unpaired, _ = phantom_volume(SHAPE, 3, "ct", seed=9)
    save_nifti(unpaired.astype(np.float32), affine, root / "fake" / "other_syn0.nii.gz")
    torch.jit.script(PooledLinear()).save(str(root / "inception.pt"))
    torch.jit.script(MeanAbs()).save(str(root / "lpips.pt"))
    return root


def config(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("evaluate", overrides=overrides)


def test_evaluate_end_to_end(folders, tmp_path):
    out = tmp_path / "out"
    cfg = config([f"real={folders / 'real'}", f"fake={folders / 'fake'}", f"labels={folders / 'labels'}",
                  f"out={out}", "data_range=2000", "window=[-1000,1000]",
                  f"inception.weights={folders / 'inception.pt'}", "inception.slices_per_axis=2",
                  f"lpips.weights={folders / 'lpips.pt'}", "device=cpu", "class_names=[air,soft,bone]"])
    run(cfg)
    report = json.loads((out / "metrics.json").read_text())
    settings, results = report["settings"], report["metrics"]
    assert settings["domain"] == "native" and settings["data_range"] == 2000.0
    assert settings["n_pairs"] == 5 and settings["unpaired_fake"] == ["other_syn0"]
    assert list(results) == list(cfg.metrics)
    expected_psnr = 20 * math.log10(2000.0 / NOISE_HU)
    assert results["psnr"]["value"] == pytest.approx(expected_psnr, abs=0.3)
    assert results["rmse"]["value"] == pytest.approx(NOISE_HU, rel=0.05)
    assert results["mae"]["value"] == pytest.approx(NOISE_HU * math.sqrt(2 / math.pi), rel=0.05)
    assert 0 < results["ssim"]["value"] < 1 and results["ssim"]["settings"]["data_range"] == 2000.0
    assert results["ms_ssim"]["settings"]["scales"] == 2 and results["ms_ssim"]["n"] == 5
    # LPIPS stand-in: mean |real - fake| of slices in [-1, 1] = mean |noise| / 1000 (no clipping at these values)
    assert results["lpips"]["value"] == pytest.approx(NOISE_HU * math.sqrt(2 / math.pi) / 1000, rel=0.1)
    fid = results["fid_2d"]
    assert set(fid["per_axis"]) == {"sagittal", "coronal", "axial"} and fid["value"] >= 0
    assert fid["n_real_slices"] == 3 * 3 * 2 and fid["n_fake_slices"] == 6 * 3 * 2
    assert results["mmd_2d"]["settings"]["bandwidth"] > 0
    for name in ("fid_3d_medicalnet", "mmd_3d_medicalnet"):
        assert results[name]["skipped"] and "medicalnet.weights" in results[name]["reason"]
    assert results["fid_3d_segmenter"]["skipped"] and "evaluation.segmentation" in results["fid_3d_segmenter"]["reason"]
    assert results["diversity"]["n_label_maps"] == 2 and 0 < results["diversity"]["value"] < 1
    stats = results["intensity_stats"]
    assert set(stats["real"]) == {"0", "1", "2"} and stats["real"]["2"]["name"] == "bone"
    assert stats["real"]["0"]["mean"] == pytest.approx(-900, abs=5)  # phantom background HU
    assert stats["synthetic"]["1"]["std"] > stats["real"]["1"]["std"]  # added noise shows up per class
    with open(out / "per_case.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["real"], r["fake"]) for r in rows] == [("case0", "case0_syn0"), ("case0", "case0_syn1"),
                                                      ("case1", "case1_syn0"), ("case1", "case1_syn1"),
                                                      ("case2", "case2_syn0")]
    assert {"ssim", "ms_ssim", "psnr", "rmse", "mae", "lpips"} <= set(rows[0])
    for figure in ("slice_panel.png", "intensity_histograms.png"):
        assert (out / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="already exists"):
        run(cfg)


def test_identical_values_inside_the_foreground(folders, tmp_path):
    """Same voxel values (different bytes on disk): SSIM = MS-SSIM = 1, PSNR written as "inf", FID 0."""
    out = tmp_path / "same"
    cfg = config([f"real={folders / 'real'}", f"fake={folders / 'same'}", f"labels={folders / 'labels'}",
                  f"out={out}", "domain=native", "data_range=2000", "foreground_only=true",
                  f"inception.weights={folders / 'inception.pt'}", "inception.slices_per_axis=2",
                  "metrics=[ssim,ms_ssim,psnr,mae,diversity,fid_3d_segmenter,fid_2d]"])
    run(cfg)
    results = json.loads((out / "metrics.json").read_text())["metrics"]
    assert results["fid_2d"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert results["ssim"]["value"] == pytest.approx(1.0, abs=1e-9)
    assert results["ms_ssim"]["value"] == pytest.approx(1.0, abs=1e-9)
    assert results["psnr"]["value"] == "inf" and results["mae"]["value"] == 0.0
    assert results["ssim"]["settings"]["foreground_only"] is True
    assert results["diversity"]["skipped"]
    assert not (out / "figures" / "intensity_histograms.png").exists()


def test_percentile_domain_removes_an_arbitrary_scanner_gain(folders, tmp_path):
    """MR units are arbitrary: a copy of each real volume with a different gain is a perfect synthesis in the
    percentile domain (SSIM 1, PSNR inf, equal class means) but not in native units."""
    for i in range(3):
        image, _ = phantom_volume(SHAPE, 3, "ct", seed=i)
        save_nifti((image.astype(np.float32) + 1000) * (0.8 + 0.1 * i), phantom_affine((2.0, 2.0, 3.0), "LPS"),
                   tmp_path / "gain" / f"case{i}_syn0.nii.gz")
    base = [f"real={folders / 'real'}", f"fake={tmp_path / 'gain'}", f"labels={folders / 'labels'}",
            "metrics=[ssim,psnr,intensity_stats]"]
    run(config(base + [f"out={tmp_path / 'pct'}", "domain=percentile", "percentiles=[1,99]"]))
    report = json.loads((tmp_path / "pct" / "metrics.json").read_text())
    results = report["metrics"]
    assert report["settings"]["percentiles"] == [1.0, 99.0] and report["settings"]["data_range"] == 2.0
    assert report["settings"]["headroom"] == 0.3  # the MR models' map: the 99th percentile -> 0.4, not 1
    assert results["ssim"]["value"] == pytest.approx(1.0, abs=1e-6) and results["psnr"]["value"] == "inf"
    assert results["intensity_stats"]["value"] == pytest.approx(0.0, abs=1e-5)
    assert results["intensity_stats"]["real"]["0"]["mean"] >= -1.0
    run(config(base + [f"out={tmp_path / 'native'}", "data_range=2000"]))
    native = json.loads((tmp_path / "native" / "metrics.json").read_text())["metrics"]
    assert native["ssim"]["value"] < 0.9 and native["intensity_stats"]["value"] > 50
    with pytest.raises(UserError, match="percentiles"):
        run(config(base + [f"out={tmp_path / 'bad'}", "domain=percentile", "percentiles=[99,1]"]))
    with pytest.raises(UserError, match="headroom"):
        run(config(base + [f"out={tmp_path / 'bad'}", "domain=percentile", "headroom=0.5"]))


def ct_with_bone_and_air(root, window=(-1000.0, 1000.0)):
    """Real CT whose bone (1600 HU) lies above the window and air (-1024 HU) below it; the synthetic volume is
    the real one clipped to the window: the best a model with that window can do."""
    affine = phantom_affine((2.0, 2.0, 3.0), orientation="LPS")
    errors = []  # unclipped: the mean |real - synthetic| the model could not avoid
    for i in range(2):
        image, label = phantom_volume(SHAPE, 3, "ct", seed=i)
        image = image.astype(np.float32)
        image[label == 2] += 700.0  # 1600 HU bone, above the window
        image[:, :, :2] = -1024.0  # air outside the body, below the window
        assert image.max() > window[1] and image.min() < window[0]
        save_nifti(image, affine, root / "real" / f"case{i}.nii.gz")
        save_nifti(np.clip(image, *window).astype(np.int16), affine, root / "fake" / f"case{i}_syn0.nii.gz",
                   dtype=np.int16)
        errors.append(float(np.abs(image - np.clip(image, *window)).mean()))
    return root, float(np.mean(errors))


def test_ct_is_clipped_to_the_model_window(tmp_path):
    """A synthetic CT equal to the real one inside the model's HU window is perfect: SSIM 1, PSNR inf, with the
    window from the stage-2 checkpoint (data range = its width) or from window=; clip=false shows the bias."""
    from ddpm_tiny import save_tiny_diffusion, tiny_diffusion

    root, unclipped_mae = ct_with_bone_and_air(tmp_path)
    ckpt = save_tiny_diffusion(tmp_path / "ct.ckpt", tiny_diffusion(), modality="ct")
    base = [f"real={root / 'real'}", f"fake={root / 'fake'}", "metrics=[ssim,psnr,mae]"]
    run(config(base + [f"out={tmp_path / 'ckpt'}", f"ckpt={ckpt}"]))
    report = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    settings, results = report["settings"], report["metrics"]
    assert settings["clipping"]["applied"] is True and settings["clipping"]["window"] == [-1000.0, 1000.0]
    assert str(ckpt) in settings["clipping"]["source"] and settings["data_range"] == 2000.0
    assert settings["window_for_2d_networks"] == [-1000.0, 1000.0]
    assert results["psnr"]["value"] == "inf" and results["mae"]["value"] == 0.0
    assert results["ssim"]["value"] == pytest.approx(1.0, abs=1e-9)
    assert results["ssim"]["settings"]["clipped_to_window"] == [-1000.0, 1000.0]

    run(config(base + [f"out={tmp_path / 'window'}", "window=[-1000,1000]", "data_range=2000"]))
    report = json.loads((tmp_path / "window" / "metrics.json").read_text())
    assert report["settings"]["clipping"] == {"applied": True, "window": [-1000.0, 1000.0], "source": "window="}
    assert report["metrics"]["psnr"]["value"] == "inf"

    run(config(base + [f"out={tmp_path / 'raw'}", f"ckpt={ckpt}", "clip=false", "data_range=2000"]))
    report = json.loads((tmp_path / "raw" / "metrics.json").read_text())
    assert report["settings"]["clipping"]["applied"] is False and report["settings"]["clipped_to_window"] is None
    assert report["metrics"]["mae"]["value"] == pytest.approx(unclipped_mae, rel=1e-5) and unclipped_mae > 1
    assert report["metrics"]["ssim"]["value"] < 0.99


def test_mr_checkpoint_has_no_window_to_clip(tmp_path):
    from ddpm_tiny import save_tiny_diffusion, tiny_diffusion

    root, _ = ct_with_bone_and_air(tmp_path)
    ckpt = save_tiny_diffusion(tmp_path / "mr.ckpt", tiny_diffusion(), modality="mr")
    base = [f"real={root / 'real'}", f"fake={root / 'fake'}", "metrics=[psnr]", f"ckpt={ckpt}"]
    with pytest.raises(UserError, match="data_range: required for domain=native"):
        run(config(base + [f"out={tmp_path / 'x'}"]))
    run(config(base + [f"out={tmp_path / 'mr'}", "data_range=2000"]))
    clipping = json.loads((tmp_path / "mr" / "metrics.json").read_text())["settings"]["clipping"]
    assert clipping["applied"] is False and "mr model without a fixed window" in clipping["source"]


def test_pairs_on_different_grids_are_refused(tmp_path):
    """Same shape, origin shifted by one voxel: a one-line error naming both files."""
    image = np.round(phantom_volume(SHAPE, 3, "ct", seed=0)[0]).astype(np.float32)
    affine = phantom_affine((2.0, 2.0, 3.0), orientation="LPS")
    save_nifti(image.astype(np.int16), affine, tmp_path / "real" / "case0.nii.gz", dtype=np.int16)
    shifted = affine.copy()
    shifted[:3, 3] += (0.0, 0.0, 3.0)
    save_nifti(image, shifted, tmp_path / "fake" / "case0_syn0.nii.gz")
    cfg = config([f"real={tmp_path / 'real'}", f"fake={tmp_path / 'fake'}", f"out={tmp_path / 'out'}",
                  "data_range=2000", "metrics=[psnr]"])
    with pytest.raises(UserError) as caught:
        run(cfg)
    message = str(caught.value)
    assert "\n" not in message and "affine differs" in message and "by up to 3 mm" in message
    assert str(tmp_path / "fake" / "case0_syn0.nii.gz") in message and str(tmp_path / "real" / "case0.nii.gz") in message
    assert not (tmp_path / "out" / "metrics.json").exists()
    save_nifti(image, affine, tmp_path / "fake" / "case0_syn0.nii.gz", overwrite=True)
    assert run(cfg)["metrics"]["psnr"]["value"] == float("inf")


def test_bad_settings_are_user_errors(folders, tmp_path):
    base = [f"real={folders / 'real'}", f"fake={folders / 'fake'}", f"out={tmp_path / 'x'}"]
    with pytest.raises(UserError, match="data_range: required for domain=native"):
        run(config(base))
    with pytest.raises(UserError, match="needs labels"):
        run(config(base + ["domain=normalized", "foreground_only=true"]))
    with pytest.raises(UserError, match="unknown"):
        run(config(base + ["data_range=2000", "metrics=[ssim,fid]"]))
    with pytest.raises(UserError, match="only used with domain=native"):
        run(config(base + ["domain=normalized", "window=[0,1]"]))


def test_cli_refuses_identical_folders_with_one_line(folders, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "evaluation.evaluate", f"real={folders / 'real'}", f"fake={folders / 'real'}",
         f"out={tmp_path / 'out'}", "data_range=2000"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and "same folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs, no Hydra folders
