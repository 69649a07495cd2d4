"""The stage-1 benchmark: what it reports follows from the settings (parameter counts, per-iteration sums,
throughput), and its peak memory grows with the crop. Both crops run in one fresh process, smaller first: the
peak is the process's running maximum, so it can only grow if the larger crop really needs more memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.bench_vqgan import VGG16Features, params_m
from utils.paths import PROJECT_ROOT

TINY = ["--config", "demo", "--device", "cpu", "--steps", "1", "--batch", "2", "--threads", "1",
        "--perceptual", "vgg16", "--override", "model.vqgan.base_channels=4", "model.loss.disc_channels=4",
        "model.vqgan.num_codes=32"]
CROPS = ([16, 16, 16], [32, 32, 32])
SCRIPT = """import json, sys
from benchmarks import bench_vqgan
args, crops = json.loads(sys.argv[1]), json.loads(sys.argv[2])
results = [bench_vqgan.main(args + ["--crop", *map(str, crop)]) for crop in crops]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def run():
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TINY), json.dumps(CROPS)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def test_reported_figures_follow_from_the_settings(run):
    (small, _), stdout = run
    assert small["crop"] == CROPS[0] and small["batch"] == 2 and small["perceptual"] == "vgg16"
    assert small["iteration_s"] == pytest.approx(small["generator_s"] + small["discriminator_s"])
    assert small["voxels_per_s"] == pytest.approx(2 * 16**3 / small["iteration_s"])
    assert small["perceptual_params_m"] == pytest.approx(params_m(VGG16Features()))  # the network it built
    assert small["perceptual_params_m"] == pytest.approx(14.714688)  # VGG16's convolutions
    assert "speedup_vs_published" not in small  # only at the published crop and batch
    assert stdout.count("iteration 0 (warm-up)") == 2 and "iteration 2" not in stdout  # --steps 1 after a warm-up


def test_peak_memory_grows_with_the_crop_and_parameters_do_not(run):
    (small, large), _ = run
    for key in ("autoencoder_params_m", "disc_2d_params_m", "disc_3d_params_m", "perceptual_params_m"):
        assert large[key] == small[key], key  # the crop changes activations, not weights
    assert large["peak_rss_gib"] > small["peak_rss_gib"] + 0.01, (small["peak_rss_gib"], large["peak_rss_gib"])
