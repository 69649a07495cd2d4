"""The synthesis CLI on tiny checkpoints: geometry of the outputs, seeds, no overwrite, bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dataset.io import save_nifti
from dataset.phantoms import phantom_affine
from ddpm.sample import run
from ddpm_tiny import save_tiny_diffusion, save_tiny_vqgan, tiny_diffusion
from utils.errors import UserError
from utils.paths import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

OBLIQUE = phantom_affine(spacing=(1.5, 1.0, 3.0), orientation="LPS", rotation_deg=(10.0, 0.0, 20.0))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_diffusion(tmp_path_factory.mktemp("ckpt") / "diff.ckpt", tiny_diffusion(label_nc=3))


def label_map(path, shape=(11, 13, 5), affine=OBLIQUE, seed=0, high=3):
    label = np.random.default_rng(seed).integers(0, high, size=shape).astype(np.uint8)
    save_nifti(label, affine, path)
    return path


def sample_cfg(compose_cfg, ckpt, labels, out, *extra):
    return compose_cfg("sample", [f"ckpt={ckpt}", f"labels={labels}", f"out={out}", "sampler=dpmpp_2m", "steps=3",
                                  *extra])


def test_outputs_sit_on_the_label_maps_grid(compose_cfg, ckpt, tmp_path):
    labels = label_map(tmp_path / "case_a.nii.gz")
    out = tmp_path / "out"
    written = run(sample_cfg(compose_cfg, ckpt, labels, out, "guidance_scale=2.0", "n_per_label=2"))
    assert [p.name for p in written] == ["case_a_syn0.nii.gz", "case_a_syn1.nii.gz"]
    source = nib.load(str(labels))
    for path in written:
        image = nib.load(str(path))
        assert image.shape == source.shape
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
        assert image.get_data_dtype() == np.float32  # MR: float in native units
        data = np.asarray(image.dataobj)
        assert np.isfinite(data).all() and data.std() > 0
        assert image.header["descrip"].item() in (b"", "")
        # native units: the stored MR reference maps [-1, 1] to [10, 500]
        assert data.min() >= 10.0 - 1e-3 and data.max() <= 500.0 + 1e-3
    sidecar = json.loads((out / "case_a_syn1.json").read_text())
    assert sidecar["sampler"] == "dpmpp_2m" and sidecar["steps"] == 3 and sidecar["guidance_scale"] == 2.0
    assert sidecar["seed"] == 0 and sidecar["index"] == 1 and len(sidecar["checkpoint"]["sha256"]) == 64
    assert "torch" in sidecar["versions"] and sidecar["label_map"] == "case_a.nii.gz"
    assert (out / "case_a_syn0.png").stat().st_size > 0
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no temporary files left behind"


def test_same_seed_same_output_and_no_overwrite(compose_cfg, ckpt, tmp_path):
    labels = label_map(tmp_path / "lab.nii.gz")
    first = run(sample_cfg(compose_cfg, ckpt, labels, tmp_path / "a", "seed=5"))[0]
    second = run(sample_cfg(compose_cfg, ckpt, labels, tmp_path / "b", "seed=5"))[0]
    other = run(sample_cfg(compose_cfg, ckpt, labels, tmp_path / "c", "seed=6"))[0]
    a, b, c = (np.asarray(nib.load(str(p)).dataobj) for p in (first, second, other))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)

    before = first.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        run(sample_cfg(compose_cfg, ckpt, labels, tmp_path / "a", "seed=6"))
    assert first.read_bytes() == before
    run(sample_cfg(compose_cfg, ckpt, labels, tmp_path / "a", "seed=6", "overwrite=true"))
    np.testing.assert_array_equal(np.asarray(nib.load(str(first)).dataobj), c)


def test_previews_progress_and_real_image(compose_cfg, ckpt, tmp_path):
    import imageio.v3 as iio

    labels = label_map(tmp_path / "lab.nii.gz")
    real = tmp_path / "real.nii.gz"
    save_nifti(np.random.default_rng(1).normal(100, 20, size=(11, 13, 5)).astype(np.float32), OBLIQUE, real)
    out = tmp_path / "out"
    run(sample_cfg(compose_cfg, ckpt, labels, out, "preview=true", "save_progress=true", f"real={real}"))
    frames = iio.imread(out / "lab_syn0.gif", index=None)
    assert frames.ndim == 4 and frames.shape[0] >= 5  # one frame per model-grid slice
    assert frames.shape[2] > 3 * 8  # label | synthetic | real side by side
    assert (out / "lab_syn0_progress.png").stat().st_size > 0
    save_nifti(np.zeros((11, 13, 6), np.float32), OBLIQUE, tmp_path / "bad_real.nii.gz")
    with pytest.raises(UserError, match="not on the grid"):
        run(sample_cfg(compose_cfg, ckpt, labels, tmp_path / "out2", "preview=true",
                       f"real={tmp_path / 'bad_real.nii.gz'}"))


def test_ct_outputs_are_integer_hounsfield_units(compose_cfg, tmp_path):
    ckpt = save_tiny_diffusion(tmp_path / "ct.ckpt", tiny_diffusion(label_nc=3), modality="ct")
    labels = label_map(tmp_path / "lab.nii.gz", affine=np.diag([2.0, 2.0, 2.0, 1.0]), shape=(8, 8, 4))
    path = run(sample_cfg(compose_cfg, ckpt, labels, tmp_path / "out"))[0]
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.int16
    data = np.asarray(image.dataobj)
    assert data.min() >= -1000 and data.max() <= 1000


def test_bad_inputs_stop_before_anything_is_written(compose_cfg, ckpt, tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    label_map(folder / "good.nii.gz")
    label_map(folder / "unknown.nii.gz", high=8, seed=3)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"unknown\.nii\.gz: label values .* not classes"):
        run(sample_cfg(compose_cfg, ckpt, folder, out))
    assert not out.exists() or not any(out.iterdir())

    (folder / "unknown.nii.gz").unlink()
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(UserError, match="broken.nii.gz"):
        run(sample_cfg(compose_cfg, ckpt, folder, out))
    (folder / "broken.nii.gz").unlink()
    save_nifti(np.full((8, 8, 4), 0.5, np.float32), np.eye(4), folder / "float.nii.gz")
    with pytest.raises(UserError, match="float.nii.gz: not a label map"):
        run(sample_cfg(compose_cfg, ckpt, folder, out))
    (folder / "float.nii.gz").unlink()

    stage1 = save_tiny_vqgan(tmp_path / "vqgan.ckpt")
    with pytest.raises(UserError, match="stage-1"):
        run(sample_cfg(compose_cfg, stage1, folder, out))
    with pytest.raises(UserError, match="not found"):
        run(sample_cfg(compose_cfg, tmp_path / "nope.ckpt", folder, out))
    with pytest.raises(UserError, match="steps=500"):
        run(sample_cfg(compose_cfg, ckpt, folder, out, "steps=500"))
    with pytest.raises(UserError, match="does not fit.*crop the label map to about"):
        run(sample_cfg(compose_cfg, ckpt, folder, out, "memory_limit_gb=0.000001"))
    assert not out.exists() or not any(out.iterdir())


def test_cli_one_line_error(ckpt, tmp_path):
    labels = label_map(tmp_path / "lab.nii.gz", high=9)
    command = [sys.executable, "-m", "ddpm.sample", f"ckpt={ckpt}", f"labels={labels}", f"out={tmp_path / 'o'}"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "lab.nii.gz" in lines[0]
    assert not (tmp_path / "o").exists()


def test_tasks_of_one_job_split_the_label_maps(monkeypatch, tmp_path):
    from ddpm.sample import task_share

    files = [tmp_path / f"{i}.nii.gz" for i in range(5)]
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert task_share(files) == files
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert task_share(files) == files[1::2]
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")  # Slurm's variables win
    assert task_share(files) == [files[2]]
