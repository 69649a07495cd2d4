"""Distributed training on CPU, the runner's rules: 2 processes over gloo, started like the tasks of an srun step
(ddp_harness.py), through the shared runner train.common.run_training with a toy LightningModule. The real stage-1
and stage-2 LightningModules under DDP are in test_ddp.py.

One pair of processes runs every scenario in turn (the `ddp_results` fixture) and the tests below check what
each scenario recorded; a scenario that raised reports its traceback to its own tests only.
"""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ddp_harness import check, run_tasks, trainer_settings


def runner_cfg(run_dir, *, max_steps, devices=2, val_check_interval=100):
    return OmegaConf.create({
        "train": {"seed": 0, "run_dir": str(run_dir), "resume": "auto", "ckpt_every_n_steps": 1000},
        "trainer": trainer_settings(max_steps=max_steps, devices=devices, val_check_interval=val_check_interval),
        "logger": None,
    })


# --------------------------------------------------------------------------------------------------------------
# Requeue: a signal seen by one rank stops every rank at the same step, with one checkpoint and one requeue.

class Regression(pl.LightningModule):
    monitor = "val/loss"

    def __init__(self, signal_rank: int | None = None, signal_step: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))
        self.signal_rank, self.signal_step = signal_rank, signal_step

    def training_step(self, batch, batch_idx):
        if self.global_rank == self.signal_rank and self.global_step == self.signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return ((batch - self.weight) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", ((batch["value"] - self.weight) ** 2).mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RegressionData(pl.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(torch.randn(16, 3, generator=g) + 2.0, batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(CaseValues(3), batch_size=1)


class CaseValues(torch.utils.data.Dataset):
    """Case `i` has the value 10 * i everywhere."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"value": torch.full((3,), 10.0 * i), "case_id": f"case{i}"}


def requeue_task(rank, out_dir):
    from train import common, requeue

    calls = []
    requeue.requeue_slurm_job = lambda job_id: calls.append(job_id) or True
    module = Regression(signal_rank=1, signal_step=3)
    try:
        common.run_training(runner_cfg(out_dir / "run", max_steps=50), module, RegressionData())
        code = "returned"
    except SystemExit as stop:
        code = stop.code
    return {"exit": code, "step": module.trainer.global_step, "requeued": calls}


def test_a_signal_on_one_rank_stops_all_ranks_at_the_same_step(ddp_results):
    results = [check(r["requeue"]) for r in ddp_results["ranks"]]
    assert [r["exit"] for r in results] == [0, 0]
    # Rank 1 alone got the signal, during step 3; both ranks finished that step and stopped together.
    assert [r["step"] for r in results] == [4, 4]
    assert results[0]["requeued"] == ["7001"] and results[1]["requeued"] == []
    saved = torch.load(ddp_results["dir"] / "requeue" / "run" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4


# --------------------------------------------------------------------------------------------------------------
# Validation metrics: Lightning's distributed validation sampler pads 3 cases to 4 on 2 ranks by repeating one.

class CaseMetrics(Regression):
    def on_validation_epoch_start(self):
        self.per_case = {}

    def validation_step(self, batch, batch_idx):
        value = batch["value"].mean()
        self.per_case[batch["case_id"][0]] = {"value": float(value)}
        self.log("val/naive_value", value, sync_dist=True, batch_size=1)  # the usual pattern, for contrast

    def on_validation_epoch_end(self):
        from train.common import mean_over_unique_cases

        self.unique_mean = mean_over_unique_cases(self.per_case)["value"]


def metrics_task(rank, out_dir):
    from train import common

    module = CaseMetrics()
    trainer = common.build_trainer(runner_cfg(out_dir, max_steps=1), module, out_dir)
    trainer.validate(module, datamodule=RegressionData(), verbose=False)
    return {
        "cases": sorted(module.per_case), "unique_mean": module.unique_mean,
        "naive_mean": float(trainer.callback_metrics["val/naive_value"]),
    }


def test_validation_metrics_count_each_case_once(ddp_results):
    results = [check(r["metrics"]) for r in ddp_results["ranks"]]
    seen = [case for r in results for case in r["cases"]]
    assert sorted(set(seen)) == ["case0", "case1", "case2"] and len(seen) == 4  # one case evaluated twice
    for r in results:
        assert r["unique_mean"] == np.mean([0.0, 10.0, 20.0])  # 10: every case once, on every rank
        assert r["naive_mean"] != r["unique_mean"]  # what a plain sync_dist mean reports instead


# --------------------------------------------------------------------------------------------------------------
# Randomness: each rank draws its own noise (the runner seeds seed + rank), while the weights stay in step.

class Draws(Regression):
    def training_step(self, batch, batch_idx):
        self.draws.append(float(torch.rand(())))
        self.rows.extend(batch[:, 0].tolist())
        return super().training_step(batch, batch_idx)


def seeds_task(rank, out_dir):
    from train import common

    module = Draws()
    module.draws, module.rows = [], []
    # 16 rows, 2 ranks x 2 rows per step: one epoch in 4 steps.
    common.run_training(runner_cfg(out_dir, max_steps=4), module, RegressionData())
    return {"draws": module.draws, "rows": module.rows, "weight": module.weight.tolist()}


def test_each_rank_draws_its_own_random_numbers_while_the_ranks_partition_the_data(ddp_results):
    results = [check(r["seeds"]) for r in ddp_results["ranks"]]
    assert len(results[0]["draws"]) == 4
    assert results[0]["draws"] != results[1]["draws"]
    # ...but the shuffling of the training set is common, so the ranks' shards partition it: every row once.
    all_rows = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))[:, 0] + 2.0
    assert sorted(results[0]["rows"] + results[1]["rows"]) == pytest.approx(sorted(all_rows.tolist()))
    assert results[0]["weight"] == results[1]["weight"]


# --------------------------------------------------------------------------------------------------------------

SCENARIOS = {"requeue": requeue_task, "metrics": metrics_task, "seeds": seeds_task}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tasks_dir = tmp_path_factory.mktemp("ddp_runner") / "tasks"
    return {"dir": tasks_dir, "ranks": run_tasks(SCENARIOS, 2, tasks_dir)}
