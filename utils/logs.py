"""Logging and progress bars of every entry point.

`setup_logging()` (run by `utils.errors.exit_on_user_error`, which wraps every entry point) makes the project's
loggers (`logging.getLogger(__name__)` in each module) print INFO messages from rank zero only (other ranks of a
distributed run or a multi-task Slurm step: warnings and errors), one plain line each on stderr, so stdout keeps
only a command's results. Under a logging configuration that is already in place (Hydra's in training, pytest's)
it adds no handler. Hydra's `job_logging: disabled` disables the loggers created before it ran; they are enabled
again here.

Progress bars: every `tqdm` bar is turned off by `TQDM_DISABLE=1` (tqdm's own switch), and the Lightning bar of
training follows `trainer.enable_progress_bar` (`auto`: off in batch logs, `train.common.resolve_progress_bar`).
"""
from __future__ import annotations

import logging
import os
import sys

PACKAGES = ("benchmarks", "dataset", "ddpm", "evaluation", "layers", "train", "utils", "vq_gan_3d")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order
FALSE_WORDS = ("0", "false", "no", "off")


def process_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched as one of several)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is at the time (as `logging.lastResort` does), so a replaced
    or captured stderr never leaves it writing to a closed stream."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    level = logging.INFO if process_rank() == 0 else logging.WARNING
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in PACKAGES:
            logger.disabled = False
    for package in PACKAGES:
        logging.getLogger(package).setLevel(level)
    if not logging.root.handlers:
        logging.root.addHandler(_Stderr())


def tqdm_disabled() -> bool:
    """True when `TQDM_DISABLE` turns tqdm's bars off."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", *FALSE_WORDS)

