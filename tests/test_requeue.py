"""Requeue on SIGUSR1 (train/requeue.py through train/common.py), on CPU without Slurm: the signal becomes a
checkpoint at a batch boundary, `scontrol requeue` is called once, and the resumed run continues the step count
and ends where an uninterrupted run ends. The same path under a real Slurm is in test_slurm.py, the multi-rank
agreement in test_ddp_runner.py."""
import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from train import common, requeue


class SignalledRegression(pl.LightningModule):
    """Fits a vector to data; sends SIGUSR1 to its own process during the training step `signal_at_step`."""

    monitor = "val/loss"

    def __init__(self, signal_at_step: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.signal_at_step = signal_at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return ((batch - self.weight) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", ((batch - self.weight) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(torch.randn(8, 3, generator=g) + 2.0, batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.full((2, 3), 2.0), batch_size=2)


def make_cfg(run_dir, max_steps):
    return OmegaConf.create(
        {
            "train": {"seed": 0, "run_dir": str(run_dir), "resume": "auto", "ckpt_every_n_steps": 100},
            "trainer": {
                "accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true", "max_steps": max_steps,
                "val_check_interval": 3, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
                "enable_progress_bar": False,
            },
            "logger": None,
        }
    )


@pytest.fixture
def fake_slurm_job(monkeypatch):
    """Environment of task 0 of a one-task batch job, and a recorder in place of `scontrol requeue`."""
    for key, value in {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "vqgan", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    calls = []

    def record(job_id):
        calls.append(job_id)
        return True

    monkeypatch.setattr(requeue, "requeue_slurm_job", record)
    return calls


def test_signal_saves_at_a_batch_boundary_requeues_and_resume_matches_a_continuous_run(tmp_path, fake_slurm_job):
    assert common.in_slurm_batch_job()
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        common.run_training(make_cfg(run_dir, max_steps=10), SignalledRegression(signal_at_step=3), Data())
    assert stopped.value.code == 0
    assert fake_slurm_job == ["4242"]  # requeued once, with this job's id
    # The signal came during the 4th step; that step finished, then training stopped with it saved. (The 4th step
    # ends an epoch of this data: a resume in mid-epoch restarts the epoch's batch order, Lightning's data loaders
    # not being resumable, and the exact comparison below would not hold.)
    saved = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler removed again

    # The requeued job: same run directory, resumes and finishes; no second signal.
    resumed = SignalledRegression()
    trainer = common.run_training(make_cfg(run_dir, max_steps=10), resumed, Data())
    assert trainer.global_step == 10
    assert fake_slurm_job == ["4242"]

    continuous = SignalledRegression()
    common.run_training(make_cfg(tmp_path / "continuous", max_steps=10), continuous, Data())
    torch.testing.assert_close(resumed.weight, continuous.weight)


def test_a_failed_requeue_exits_non_zero(tmp_path, fake_slurm_job, monkeypatch):
    monkeypatch.setattr(requeue, "requeue_slurm_job", lambda job_id: False)
    with pytest.raises(SystemExit) as stopped:
        common.run_training(make_cfg(tmp_path, max_steps=10), SignalledRegression(signal_at_step=1), Data())
    assert stopped.value.code not in (0, None)  # `afterok` dependants must not start on an unfinished stage
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2


def test_outside_slurm_sigusr1_is_not_taken_over(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    trainer = common.build_trainer(make_cfg(tmp_path, max_steps=2), SignalledRegression(), tmp_path)
    assert not any(isinstance(cb, requeue.RequeueOnSignal) for cb in trainer.callbacks)


def test_array_jobs_are_requeued_by_array_and_task_id(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert requeue.slurm_job_id() == "100_1"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert requeue.slurm_job_id() == "101"


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = common.AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the job being killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind
