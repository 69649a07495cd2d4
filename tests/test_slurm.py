"""The real vqgan.sh and diffusion.sh through a real Slurm (CI starts a one-node one with .ci/slurm/start.sh).

Skipped only when `sbatch` is not on PATH and MEDLSDM_REQUIRE_SLURM is unset; with MEDLSDM_REQUIRE_SLURM set (CI)
a missing or unhealthy Slurm is a failure. Jobs ask for no GPU and one core per task (command-line options win
over the scripts' #SBATCH lines, the documented way for CPU-only partitions) and train tiny models for a few
steps on a small demo data set. They run in a temporary submission directory, which receives logs/ and runs/.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=4G", "--time=20"]
JOB_TIMEOUT_S = 600
# The small demo of conftest's `demo_cfg` (built once into the session cache, which the jobs inherit through
# $XDG_CACHE_HOME), a CSV logger, and validation/checkpoints often enough to exercise them.
DEMO = [
    "experiment=demo", "dataset.demo.n_subjects=6", "dataset.spacing=[6.0,6.0,6.0]", "dataset.crop_size=[32,32,16]",
    "dataset.num_workers=0", "dataset.batch_size=1", "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]
VQGAN_TINY = [
    "model.vqgan.base_channels=4", "model.vqgan.channel_mult=[1,1,1]", "model.vqgan.norm_groups=2",
    "model.vqgan.embedding_dim=4", "model.loss.perceptual_weight=0",
    "model.loss.disc_channels=4", "model.loss.disc_layers=2", "model.loss.gan_start_step=3",
    "model.vqgan.gradient_checkpointing=false", "model.val_image_volumes=1",
]
DIFFUSION_TINY = [
    "model.diffusion.unet.base_channels=8", "model.diffusion.unet.channel_mult=[1,2]",
    "model.diffusion.unet.attention_levels=[]", "model.diffusion.unet.head_channels=8",
    "model.diffusion.unet.group_width=4", "model.diffusion.unet.norm_groups=4",
    "model.diffusion.unet.mask_channels=4", "model.diffusion.unet.mask_hidden_channels=4",
    "model.diffusion.unet.spade_hidden_channels=8", "model.diffusion.timesteps=50", "model.scale_factor_batches=2",
    "model.validation.steps=2", "model.validation.n_volumes=1",
]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        if os.environ.get("MEDLSDM_REQUIRE_SLURM"):
            pytest.fail("MEDLSDM_REQUIRE_SLURM is set but sbatch is not on PATH: run `bash .ci/slurm/start.sh`")
        pytest.skip("no Slurm here (sbatch not on PATH); set MEDLSDM_REQUIRE_SLURM=1 to make this a failure")
    states = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True)
    if states.returncode != 0 or not re.search(r"idle|mix|alloc", states.stdout):
        pytest.fail(f"Slurm is installed but no node accepts jobs: {states.stdout.strip()} {states.stderr.strip()}")


@pytest.fixture
def submit_dir(tmp_path, demo_cfg):
    (tmp_path / "logs").mkdir()
    return tmp_path


def job_environment() -> dict[str, str]:
    """What the jobs inherit (sbatch exports the submitting environment): this interpreter as $PYTHON, so the
    jobs use the test's environment even when it is not activated on PATH."""
    return {**os.environ, "PYTHON": sys.executable}


def sbatch(cwd: Path, *args: str) -> str:
    result = subprocess.run(["sbatch", "--parsable", *CPU_JOB, *args], cwd=cwd, capture_output=True, text=True,
                            env=job_environment())
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) while Slurm still lists the job (finished jobs stay listed for MinJobAge), else ("", "")."""
    result = subprocess.run(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T|%r"],
                            capture_output=True, text=True)
    line = result.stdout.strip()
    return tuple(line.split("|", 1)) if "|" in line else ("", "")


def wait_for(*job_ids: str, log: Path, until=lambda state: state == "", timeout: float = JOB_TIMEOUT_S):
    """Poll all jobs until `until(state)` holds for each; returns their last listed states (e.g. COMPLETED,
    FAILED, CANCELLED; finished jobs stay listed for MinJobAge, so every job is polled on every round)."""
    deadline = time.monotonic() + timeout
    last = {job: "" for job in job_ids}
    while time.monotonic() < deadline:
        states = {job: job_state(job)[0] for job in job_ids}
        last.update({job: state for job, state in states.items() if state})
        if all(until(state) for state in states.values()):
            return [states[job] or last[job] for job in job_ids]
        time.sleep(1.0)
    subprocess.run(["scancel", *job_ids])
    pytest.fail(f"jobs {job_ids} still {last} after {timeout} s; log:\n{read(log)}")


def read(path: Path) -> str:
    return path.read_text() if path.exists() else f"({path} does not exist)"


def checkpoint(path: Path) -> dict:
    assert path.is_file(), f"{path} missing"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_stage_one_then_stage_two_with_afterok(slurm, submit_dir):
    vqgan_job = sbatch(submit_dir, "--ntasks-per-node=2", str(PROJECT_ROOT / "vqgan.sh"), *DEMO, *VQGAN_TINY,
                       "trainer.max_steps=6", "trainer.val_check_interval=3", "train.ckpt_every_n_steps=3")
    vqgan_dir = submit_dir / "runs" / f"vqgan-demo-{vqgan_job}"
    diffusion_job = sbatch(submit_dir, f"--dependency=afterok:{vqgan_job}", str(PROJECT_ROOT / "diffusion.sh"),
                           *DEMO, *DIFFUSION_TINY, f"model.vqgan_ckpt={vqgan_dir}/last.ckpt",
                           "trainer.max_steps=4", "trainer.val_check_interval=2", "train.ckpt_every_n_steps=2")
    state, reason = job_state(diffusion_job)
    assert state == "PENDING" and reason == "Dependency"  # waits for stage 1

    vqgan_log = submit_dir / "logs" / f"vqgan-{vqgan_job}.out"
    diffusion_log = submit_dir / "logs" / f"diffusion-{diffusion_job}.out"
    vqgan_state, diffusion_state = wait_for(vqgan_job, diffusion_job, log=vqgan_log)
    assert vqgan_state == "COMPLETED", read(vqgan_log)
    assert diffusion_state == "COMPLETED", read(diffusion_log)

    # Stage 1 ran as two srun tasks (DDP over gloo), in the run directory named after its job id.
    assert "2 task(s)" in read(vqgan_log)
    stage1 = checkpoint(vqgan_dir / "last.ckpt")
    assert stage1["stage"] == "vqgan" and stage1["global_step"] >= 6
    stage2 = checkpoint(submit_dir / "runs" / f"diffusion-demo-{diffusion_job}" / "last.ckpt")
    assert stage2["stage"] == "diffusion" and stage2["global_step"] == 4
    assert torch.isfinite(stage2["state_dict"]["model.scale_factor"])


def test_a_failed_stage_one_cancels_stage_two(slurm, submit_dir):
    vqgan_job = sbatch(submit_dir, str(PROJECT_ROOT / "vqgan.sh"), *DEMO, f"dataset.root_dir={submit_dir}/missing")
    diffusion_job = sbatch(submit_dir, f"--dependency=afterok:{vqgan_job}", str(PROJECT_ROOT / "diffusion.sh"),
                           *DEMO, "model.vqgan_ckpt=never-written.ckpt")
    vqgan_log = submit_dir / "logs" / f"vqgan-{vqgan_job}.out"
    assert wait_for(vqgan_job, diffusion_job, log=vqgan_log) == ["FAILED", "CANCELLED"]
    assert "missing" in read(vqgan_log)  # the one-line error names the folder
    assert not (submit_dir / "logs" / f"diffusion-{diffusion_job}.out").exists()  # it never started


def test_requeue_on_usr1_resumes_and_continues_the_step_count(slurm, submit_dir):
    max_steps = 60
    job = sbatch(submit_dir, str(PROJECT_ROOT / "vqgan.sh"), *DEMO, *VQGAN_TINY, f"trainer.max_steps={max_steps}",
                 "trainer.val_check_interval=1000", "train.ckpt_every_n_steps=2")
    run_dir = submit_dir / "runs" / f"vqgan-demo-{job}"
    log = submit_dir / "logs" / f"vqgan-{job}.out"
    # A job that needs this one to succeed (as stage 2 needs stage 1) waits through the requeue.
    dependant = sbatch(submit_dir, f"--dependency=afterok:{job}", "--output=dependant.out",
                       "--wrap=echo dependant ran")

    # Signal once training is under way (a checkpoint exists), as Slurm does 90 s before the time limit.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (run_dir / "last.ckpt").is_file():
        assert job_state(job)[0] in ("PENDING", "RUNNING"), read(log)
        assert time.monotonic() < deadline, read(log)
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)

    # The job goes back to the queue under the same id. Slurm holds a requeued job for two minutes before it
    # may start again; let it start now.
    wait_for(job, log=log, until=lambda state: state == "PENDING")
    assert job_state(job)[1] == "BeginTime"
    assert job_state(dependant) == ("PENDING", "Dependency")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    assert wait_for(job, dependant, log=log) == ["COMPLETED", "COMPLETED"], read(log)
    assert read(submit_dir / "dependant.out").strip() == "dependant ran"

    text = read(log)
    saved = re.search(r"requeue: saved (\S+) at step (\d+)", text)
    assert saved, text
    stopped_at = int(saved.group(2))
    assert 0 < stopped_at < max_steps
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text
    assert f"resuming from {run_dir.relative_to(submit_dir)}/last.ckpt" in text
    # The second attempt continued from the saved step: its logged steps start there, and it ended at max_steps.
    assert checkpoint(run_dir / "last.ckpt")["global_step"] == max_steps
    versions = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    assert len(versions) == 2, versions
    with versions[1].open() as handle:
        resumed_steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert resumed_steps and min(resumed_steps) >= stopped_at


def test_one_command_submits_the_whole_pipeline(slurm, submit_dir):
    prefixed = [f"vqgan:{o}" for o in [*VQGAN_TINY, "trainer.max_steps=4", "trainer.val_check_interval=2"]] + [
        f"diffusion:{o}" for o in [*DIFFUSION_TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"]]
    result = subprocess.run(
        ["bash", str(PROJECT_ROOT / "train" / "submit.sh"), "--run-dir=runs/pipeline", *CPU_JOB, *DEMO, *prefixed,
         "sample:steps=2", "evaluate:metrics=[ssim,psnr,mae,intensity_stats]", "evaluate:data_range=700"],
        cwd=submit_dir, capture_output=True, text=True, env=job_environment())
    assert result.returncode == 0, result.stderr
    run_dir = submit_dir / "runs" / "pipeline"
    jobs = (run_dir / "jobs.txt").read_text().split()
    assert len(jobs) == 3
    # Stage 2 waits for stage 1, synthesis + evaluation for stage 2.
    assert [job_state(job)[1] for job in jobs[1:]] == ["Dependency", "Dependency"]

    logs = [submit_dir / "logs" / f"{name}-{job}.out" for name, job in zip(("vqgan", "diffusion", "sample-eval"),
                                                                             jobs)]
    states = wait_for(*jobs, log=logs[0])
    assert states == ["COMPLETED"] * 3, "\n".join(read(log) for log in logs)

    assert checkpoint(run_dir / "vqgan" / "last.ckpt")["stage"] == "vqgan"
    assert checkpoint(run_dir / "diffusion" / "last.ckpt")["stage"] == "diffusion"
    test_cases = sorted(p.name for p in (run_dir / "test" / "labels").iterdir())
    assert test_cases  # the held-out split of the stage-2 run
    split = json.loads((run_dir / "diffusion" / "split.json").read_text())
    assert test_cases == sorted(f"{case}.nii.gz" for case in split["test"])
    samples = sorted(p.name for p in (run_dir / "samples").glob("*.nii.gz"))
    assert samples == [name.replace(".nii.gz", "_syn0.nii.gz") for name in test_cases]
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())["metrics"]
    assert metrics["ssim"]["n"] == metrics["psnr"]["n"] == len(test_cases)
    assert -1.0 <= metrics["ssim"]["value"] <= 1.0 and np.isfinite(metrics["psnr"]["value"])
