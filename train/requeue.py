"""Save and requeue a Slurm job when it is told its time is nearly up.

Slurm sends SIGUSR1 to the training tasks 90 s before the time limit (`#SBATCH --signal=USR1@90` in vqgan.sh and
diffusion.sh), and `scancel --batch --signal=USR1 <job>` reaches them through the launch script. The signal
handler only raises a flag. At the end of the next training batch every rank learns whether any rank saw it (one
all-reduce), all ranks save `last.ckpt` at that same step, and the fit stops. Rank 0 then runs
`scontrol requeue <job>`: the job goes back to the queue with the same job id, so the launch script gives it the
same run directory and `train.resume=auto` continues from the checkpoint with the global step where it was.

Lightning's own auto-requeue saves from inside the signal handler, so with several ranks each rank may save at a
different point, mid-step, and the collective inside the save can pair with an unrelated collective of another
rank; this module replaces it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class RequeueRequested(Exception):
    """Raised on every rank, at the same step, once the requeue checkpoint is on disk."""


def slurm_job_id() -> str | None:
    """The id that `scontrol requeue` needs: `<array job>_<task>` for array jobs, else `SLURM_JOB_ID`."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str) -> bool:
    """Put the job back into the queue; True on success. Slurm then stops the running instance."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        log.warning("requeue: scontrol not found")
        return False
    if result.returncode != 0:
        log.warning("requeue: scontrol requeue %s failed: %s", job_id, result.stderr.strip())
    return result.returncode == 0


class RequeueOnSignal(pl.Callback):
    """Turns a signal into a synchronised checkpoint at a batch boundary followed by `RequeueRequested`."""

    def __init__(self, *, checkpoint_path: Path, signum: int = signal.SIGUSR1) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signum = signum
        self.signal_received = False
        self._previous_handler = None

    def install(self) -> None:
        """Register the handler (main thread only). Done before the data loaders start, so that their worker
        processes inherit it instead of dying from the signal's default action."""
        self._previous_handler = signal.signal(self.signum, self._on_signal)

    def uninstall(self) -> None:
        if self._previous_handler is not None:
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_received = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        # Every rank reaches this point once per batch, so the reduction pairs up across ranks.
        if not trainer.strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        trainer.save_checkpoint(self.checkpoint_path)  # rank 0 writes, then all ranks meet at a barrier
        if trainer.is_global_zero:
            log.info("requeue: saved %s at step %d", self.checkpoint_path, trainer.global_step)
        raise RequeueRequested(str(self.checkpoint_path))


def finish_after_requeue_request(is_global_zero: bool) -> None:
    """Called once the fit has stopped for a requeue: rank 0 requeues the job; every rank exits.
    Exit status 0 when requeued (the job comes back), 1 when not (so `afterok` dependants do not start)."""
    if not is_global_zero:
        sys.exit(0)
    job_id = slurm_job_id()
    if job_id and requeue_slurm_job(job_id):
        log.info("requeue: job %s requeued; it will resume from its checkpoint", job_id)
        sys.exit(0)
    sys.exit(
        "requeue: the job could not be requeued; the checkpoint is saved, resubmit with the same "
        "train.run_dir to continue"
    )
