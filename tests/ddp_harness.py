"""Run a function in N processes that look like the N tasks of one Slurm job step on one node (the environment
srun gives each task), so that Lightning's SLURMEnvironment sets the ranks and DDP runs on CPU over gloo, exactly
as `srun` starts training on a cluster. Used by test_ddp.py and test_ddp_runner.py, with their shared
`trainer_settings` (the CPU DDP trainer) and `check` (a scenario's result or its recorded failure).

The processes are forked, so they start with everything the test process has imported (no new interpreter that
imports torch and Lightning again); each sets one intra-op thread first, as PyTorch's data-loader workers do.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_task_environment(rank: int, world_size: int, port: int, job_id: str = "7001") -> dict[str, str]:
    return {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "ddp-test", "SLURM_NTASKS": str(world_size),
        "SLURM_NTASKS_PER_NODE": str(world_size), "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1",
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }


def _task(rank: int, scenarios: dict[str, Callable], world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[key]
    os.environ.update(slurm_task_environment(rank, world_size, port))
    results = {}
    for name, scenario in scenarios.items():
        try:
            results[name] = scenario(rank, Path(out_dir) / name)
        except BaseException:  # noqa: BLE001 - reported to the test that checks this scenario
            results[name] = {"error": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def run_tasks(scenarios: dict[str, Callable], world_size: int, out_dir: Path, timeout: float = 600) -> list[dict]:
    """Run each `scenario(rank, out_dir / name) -> JSON-able` in turn in `world_size` processes; returns, per
    rank, `{name: result or {"error": traceback}}`. Processes still running after `timeout` s are killed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_task, args=(scenarios, world_size, free_port(), str(out_dir)),
                                 nprocs=world_size, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"DDP tasks still running after {timeout} s (a collective that not every rank "
                               "called?)")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def trainer_settings(*, max_steps, devices=2, val_check_interval=100):
    return {
        "accelerator": "cpu", "devices": devices, "num_nodes": 1, "strategy": "ddp" if devices > 1 else "auto",
        "precision": "32-true", "max_steps": max_steps, "val_check_interval": val_check_interval,
        "check_val_every_n_epoch": None, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "enable_model_summary": False,
    }


def check(result):
    """A scenario's result, or the failure with the traceback it recorded."""
    if "error" in result:
        pytest.fail(result["error"])
    return result
