"""Logging on rank zero (utils.logs.setup_logging, run by every entry point) and the progress-bar switch of
training (train.common.resolve_progress_bar)."""
import os
import subprocess
import sys

import pytest

from train.common import resolve_progress_bar
from utils.errors import UserError
from utils.paths import PROJECT_ROOT

# A module logger created at import, then Hydra's `job_logging: disabled` (which disables existing loggers and
# leaves the root without handlers), then an entry point's setup.
SCRIPT = """import logging, logging.config
log = logging.getLogger("dataset.some_module")
logging.config.dictConfig({"version": 1, "root": {"level": "ERROR"}, "disable_existing_loggers": True})
from utils.logs import setup_logging
setup_logging()
log.info("an info line")
log.warning("a warning line")
logging.getLogger("some_library").info("a library's info line")
print("the result")
"""


def run_script(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID")}
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=60, env={**clean, "PYTHONPATH": str(PROJECT_ROOT), **env})


def test_rank_zero_logs_info_lines_on_stderr_and_results_stay_on_stdout():
    done = run_script()
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["an info line", "a warning line"]  # plain lines; libraries stay quiet
    assert done.stdout == "the result\n"


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK", "SLURM_PROCID"])
def test_other_ranks_log_warnings_only(variable):
    done = run_script(**{variable: "1"})
    assert done.stderr.splitlines() == ["a warning line"]


def test_progress_bar_setting(monkeypatch):
    for key in ("TQDM_DISABLE", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_progress_bar(True) is True and resolve_progress_bar(False) is False
    assert resolve_progress_bar("auto") is True
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert resolve_progress_bar("auto") is False and resolve_progress_bar(True) is True  # explicit wins
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert resolve_progress_bar("auto") is True
    monkeypatch.setenv("SLURM_NTASKS", "1")  # inside an sbatch/srun job: a batch log
    monkeypatch.setenv("SLURM_JOB_NAME", "vqgan")
    assert resolve_progress_bar("auto") is False
    with pytest.raises(UserError, match=r"^trainer.enable_progress_bar: expected true, false or auto, got 'yes'$"):
        resolve_progress_bar("yes")
