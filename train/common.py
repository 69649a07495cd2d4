"""What both training stages share: run directory, logger, checkpoints, resume, precision, Slurm requeue,
and the middle-slice image logged at every validation."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.plugins.io import TorchCheckpointIO

from train.requeue import RequeueOnSignal, RequeueRequested, finish_after_requeue_request
from utils.atomic import atomic_path
from utils.device import native_bf16
from utils.errors import UserError
from utils.logs import tqdm_disabled

log = logging.getLogger(__name__)

LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str | int:
    """"auto": bf16 mixed precision (autocast, float32 weights) where the training device computes in bfloat16
    natively (`utils.device.native_bf16`: GPUs that support it, CPUs with AVX512-BF16 or AMX), full 32-bit float
    elsewhere. On a 2-core AMD Zen 4 VM bf16 makes the demo's stage-1 steps about 20 % faster and the label
    generator's diffusion steps 27 %, stage 2's small steps 2 % (README, What the demo gives)."""
    if precision != "auto":
        return precision
    on_gpu = str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    resolved = "bf16-mixed" if native_bf16(device) else "32-true"
    log.info("trainer.precision=auto: %s on the %s", resolved, "GPU" if on_gpu else "CPU")
    return resolved


def resolve_progress_bar(setting: bool | str) -> bool:
    """`trainer.enable_progress_bar`: true | false | auto (a bar unless `TQDM_DISABLE` is set or this is a Slurm
    batch job, whose log a bar would fill with carriage-return updates)."""
    if isinstance(setting, bool):
        return setting
    if str(setting).strip().lower() != "auto":
        raise UserError(f"trainer.enable_progress_bar: expected true, false or auto, got {setting!r}")
    return not (tqdm_disabled() or in_slurm_batch_job())


def find_resume_checkpoint(run_dir: Path, resume: str | None) -> str | None:
    """`auto`: `<run_dir>/last.ckpt` (also what a Slurm requeue saves, see `train.requeue`), or None for a fresh
    run; `never`: None; anything else: a checkpoint path that must exist."""
    if resume in (None, "never"):
        return None
    if resume == "auto":
        last = run_dir / LAST_CKPT
        return str(last) if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"{path}: train.resume points at a checkpoint that does not exist")
    return str(path)


def in_slurm_batch_job() -> bool:
    """True inside an sbatch/srun job, False in an interactive `salloc` shell or outside Slurm."""
    return SLURMEnvironment.detect()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written under a temporary name and renamed, so a job killed mid-save (time limit, node
    failure) leaves the previous `last.ckpt` intact instead of a truncated one that `resume=auto` cannot load."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path, overwrite=True) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class SeedPerRank(pl.Callback):
    """Under DDP, one random stream per rank (seed + rank): otherwise every rank draws the same noise, timesteps,
    crops and slices, and the larger batch adds no variety. Set in `setup`, where ranks are known whichever way the
    processes were started. Weights need no common seed: DDP copies rank 0's to every rank."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            pl.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)
            # Lightning's DistributedSampler shuffles with PL_GLOBAL_SEED, which must stay common to all ranks:
            # with one seed per rank the ranks' shards would overlap instead of partitioning the data set.
            os.environ["PL_GLOBAL_SEED"] = str(self.seed)


def build_trainer(cfg: DictConfig, module: pl.LightningModule, run_dir: Path) -> pl.Trainer:
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs["precision"],
                                                    trainer_kwargs.get("accelerator", "auto"))
    trainer_kwargs["enable_progress_bar"] = resolve_progress_bar(trainer_kwargs.get("enable_progress_bar", "auto"))
    callbacks = [
        # last.ckpt: every `ckpt_every_n_steps` optimisation steps and at the end of training.
        ModelCheckpoint(
            dirpath=run_dir,
            filename="last",
            every_n_train_steps=cfg.train.ckpt_every_n_steps,
            save_top_k=1,
            enable_version_counter=False,
            save_on_train_epoch_end=True,
        ),
        # best.ckpt: lowest validation reconstruction/denoising error seen so far.
        ModelCheckpoint(
            dirpath=run_dir,
            filename="best",
            monitor=module.monitor,
            mode="min",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        ),
        SeedPerRank(int(cfg.train.seed)),
    ]
    plugins = [AtomicCheckpointIO()]
    if in_slurm_batch_job():
        # On SIGUSR1 (sbatch --signal=USR1@90) all ranks save last.ckpt at the same batch boundary and rank 0
        # requeues the job (train/requeue.py); Lightning's own handler, which saves mid-step, stays off.
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(RequeueOnSignal(checkpoint_path=run_dir / LAST_CKPT))
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    return pl.Trainer(
        **trainer_kwargs,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=plugins,
        enable_checkpointing=True,
    )


def run_training(cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> pl.Trainer:
    """Fit `module` on `datamodule` in `cfg.train.run_dir`, resuming according to `cfg.train.resume`."""
    # Lightning notices that do not apply here: frozen networks (perceptual backbone, stage 1) are in eval mode
    # on purpose, and logging counts optimisation steps across epochs, so short epochs lose no log entries;
    # stage 1's manual optimisation checkpoints the state after the step, which is what a resumed run continues.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*no pre-optimization state was saved.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    pl.seed_everything(cfg.train.seed, workers=True)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = find_resume_checkpoint(run_dir, cfg.train.resume)
    trainer = build_trainer(cfg, module, run_dir)
    if ckpt_path and trainer.is_global_zero:
        log.info("resuming from %s", ckpt_path)
    requeue = next((cb for cb in trainer.callbacks if isinstance(cb, RequeueOnSignal)), None)
    if requeue is not None:
        requeue.install()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except RequeueRequested:
        finish_after_requeue_request(trainer.is_global_zero)  # exits the process
    finally:
        if requeue is not None:
            requeue.uninstall()
    # Make sure last.ckpt holds the final state even when max_steps ended mid-interval.
    trainer.save_checkpoint(run_dir / LAST_CKPT, weights_only=False)
    return trainer


def lr_factor(step: int, decay_start: int | None, max_steps: int) -> float:
    """Learning-rate multiplier: 1, or from `decay_start` on a linear decay to 0 at `max_steps` (a function of
    the step alone, so a resumed run follows the same schedule)."""
    if decay_start is None or max_steps <= decay_start or step < decay_start:
        return 1.0
    return max(0.0, 1.0 - (step - decay_start) / (max_steps - decay_start))


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_unique_cases(per_case: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over distinct cases, gathered from every rank.

    Under DDP Lightning's validation sampler repeats cases so that all ranks get as many batches; keyed by case
    id, a repeated case is counted once. Every rank must call this (it is a collective) and gets the same result.
    `per_case` maps a case id to its metrics, e.g. {"case007": {"l1": 0.05, "psnr": 31.2}}."""
    merged = dict(per_case)
    if _world_size() > 1:
        gathered: list = [None] * _world_size()
        dist.all_gather_object(gathered, per_case)
        for rank_cases in gathered:
            merged.update(rank_cases)
    names = sorted({name for metrics in merged.values() for name in metrics})
    return {
        name: float(np.mean([metrics[name] for metrics in merged.values() if name in metrics])) for name in names
    }


def _to_display(array: np.ndarray) -> np.ndarray:
    """Scale a 2D array to [0, 1] for display only (min-max of this slice)."""
    array = np.asarray(array, dtype=np.float32)
    lo, hi = float(array.min()), float(array.max())
    return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)


def image_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile rows of 2D arrays (each shown rotated so that anterior is up) into one grey-scale image in [0, 1]."""
    tiles = [[np.rot90(_to_display(a)) for a in row] for row in rows]
    height = max(t.shape[0] for row in tiles for t in row)
    width = max(t.shape[1] for row in tiles for t in row)
    n_cols = max(len(row) for row in tiles)
    grid = np.ones((len(tiles) * (height + pad) + pad, n_cols * (width + pad) + pad), dtype=np.float32)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    return grid


def save_image_grid(module: pl.LightningModule, name: str, rows: list[list[np.ndarray]]) -> Path | None:
    """Write `<run_dir>/images/<name>_step<k>.png` and send it to the logger if that takes images.
    Rows are lists of 2D arrays (e.g. middle slices of input, reconstruction, label)."""
    trainer = module.trainer
    if not trainer.is_global_zero:
        return None
    import imageio.v3 as iio

    grid = image_grid(rows)
    out_dir = Path(trainer.default_root_dir) / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name.replace('/', '_')}_step{trainer.global_step:07d}.png"
    iio.imwrite(path, (grid * 255).round().astype(np.uint8))
    logger = trainer.logger
    if isinstance(logger, pl.loggers.WandbLogger):
        logger.log_image(key=name, images=[grid], step=trainer.global_step)
    elif isinstance(logger, pl.loggers.TensorBoardLogger):
        logger.experiment.add_image(name, grid[None], global_step=trainer.global_step)
    return path
