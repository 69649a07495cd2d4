"""The stage-2 benchmark: its figures follow from what it timed (ratios to the published code, per-step and
per-volume sums), its peak memory grows with the image, and a case that runs past its time limit is reported as
timed out rather than dropped or measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import bench_diffusion
from utils.paths import PROJECT_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.diffusion.unet.base_channels=8", "model.diffusion.unet.head_channels=8",
        "model.diffusion.unet.group_width=4", "model.diffusion.unet.norm_groups=4",
        "model.diffusion.unet.mask_channels=4", "model.diffusion.unet.mask_hidden_channels=4",
        "model.diffusion.unet.spade_hidden_channels=4"]
SPEC = {"config": "demo", "device": "cpu", "overrides": TINY, "vqgan_overrides": [], "batch": 1, "name": "train_small",
        "kind": "train", "steps": 1}
# Both images in one fresh process, smaller first: the peak is the process's running maximum, so the second
# case's can only exceed the first's if the larger image really needs more memory.
SCRIPT = """import json, sys
from benchmarks import bench_diffusion
print(json.dumps([bench_diffusion.run_child(spec) for spec in json.loads(sys.argv[1])]))
"""


def test_training_and_sampling_figures_follow_from_the_timings():
    train = bench_diffusion.with_ratios(bench_diffusion.run_child({**SPEC, "image": [16, 16, 16]}))
    assert train["latent"] == [16, 4, 4, 4]  # the demo stage 1: 16 latent channels, every axis halved twice
    assert train["speedup_vs_published"] == pytest.approx(1.26 / train["step_s"])  # published, side by side (issue 15)
    assert train["memory_fraction_of_published"] == pytest.approx(train["peak_gib"] / 1.58)
    assert train["rss_after_import_gib"] <= train["peak_gib"]  # a peak is a running maximum
    assert f"step {train['step_s']:.3f} s" in bench_diffusion.describe(train)
    sample = bench_diffusion.run_child({**SPEC, "image": [16, 16, 16], "name": "sample", "kind": "sample",
                                        "sampler": "dpmpp_2m", "steps": 2, "warmup": False})
    assert sample["volume_s"] == pytest.approx(sample["sample_s"] + sample["decode_s"])
    assert sample["guided_step_s"] == pytest.approx(sample["sample_s"] / 2)
    assert "speedup_vs_published_500_steps" not in bench_diffusion.with_ratios(sample)  # not the published size
    assert "synthesis [16, 16, 16] dpmpp_2m 2 steps" in bench_diffusion.describe(sample)


def test_peak_memory_grows_with_the_image():
    # --vqgan-override reaches stage 1: the demo's 16 latent channels become 8
    specs = [{**SPEC, "image": image, "vqgan_overrides": ["model.vqgan.embedding_dim=8"]}
             for image in ([16, 16, 16], [96, 96, 32])]
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(specs)], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    small, large = json.loads(done.stdout.strip().splitlines()[-1])
    assert (small["latent"], large["latent"]) == ([8, 4, 4, 4], [8, 24, 24, 8])
    assert large["unet_params_m"] == small["unet_params_m"]
    assert large["peak_gib"] > small["peak_gib"] + 0.01, (small["peak_gib"], large["peak_gib"])


def test_a_case_past_its_time_limit_is_reported_as_timed_out(capsys):
    # The paper-size training case cannot even import torch and build its models in one second.
    results = bench_diffusion.main(["--config", "paper", "--cases", "train_large_b2", "--timeout", "1"])
    assert [(r["case"], r["error"]) for r in results] == [("train_large_b2", "timed out after 1 s")]
    assert "step_s" not in results[0] and "peak_gib" not in results[0]  # nothing measured is reported
    assert "train_large_b2: timed out after 1 s" in capsys.readouterr().out


def test_a_child_reports_its_own_peak_not_its_parents():
    """getrusage's ru_maxrss survives exec (a child starts from its parent's RSS); the benchmarks' peak must not."""
    import numpy as np

    ballast = np.ones(2**26)  # 0.5 GiB resident in this (parent) process
    done = subprocess.run([sys.executable, "-c", "from benchmarks.common import peak_rss_gib; print(peak_rss_gib())"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert float(done.stdout) < 0.1 and ballast.sum() == 2**26
