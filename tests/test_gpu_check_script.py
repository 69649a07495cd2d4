"""benchmarks/gpu_check.sh on a machine without a usable CUDA GPU: one line saying so, exit 0, nothing written."""
from __future__ import annotations

import os
import subprocess

import pytest

from utils.paths import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_check.sh"


def run_script(tmp_path, environment):
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env={**environment, "OUT": str(tmp_path / "out")},
                          capture_output=True, text=True, timeout=60)


def assert_says_no_gpu(done, tmp_path):
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0
    assert lines == ["gpu_check: no CUDA GPU on this machine; nothing to check"]
    assert not (tmp_path / "out").exists()  # no JSON, no logs


def test_hidden_gpus_are_no_gpu(tmp_path):
    """CUDA_VISIBLE_DEVICES="" hides every GPU from CUDA, so the check must not run even where nvidia-smi sees one."""
    assert_says_no_gpu(run_script(tmp_path, {**os.environ, "CUDA_VISIBLE_DEVICES": ""}), tmp_path)


@pytest.mark.parametrize("listing", ["", "No devices were found"], ids=["empty", "no devices"])
def test_nvidia_smi_listing_no_gpu(tmp_path, listing):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text(f"#!/bin/sh\necho '{listing}'\nexit 6\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    environment["PATH"] = f"{fake_bin}{os.pathsep}{environment['PATH']}"
    assert_says_no_gpu(run_script(tmp_path, environment), tmp_path)
