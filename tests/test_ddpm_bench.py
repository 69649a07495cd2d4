"""The stage-2 benchmark's cases run (tiny crops, a tiny UNet) and report what they promise."""
from __future__ import annotations

import pytest

from benchmarks import bench_diffusion
from ddpm_tiny import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.diffusion.unet.base_channels=8", "model.diffusion.unet.head_channels=8",
        "model.diffusion.unet.group_width=4", "model.diffusion.unet.norm_groups=4",
        "model.diffusion.unet.mask_channels=4", "model.diffusion.unet.mask_hidden_channels=4",
        "model.diffusion.unet.spade_hidden_channels=4"]


def test_training_and_sampling_cases_report_times_memory_and_ratios():
    spec = {"config": "demo", "device": "cpu", "overrides": TINY, "image": [16, 16, 16], "batch": 1}
    train = bench_diffusion.with_ratios(bench_diffusion.run_child({**spec, "name": "train_small", "kind": "train",
                                                                   "steps": 1}))
    assert train["latent"] == [8, 4, 4, 4] and train["step_s"] > 0 and train["encode_batch_s"] > 0
    assert 0 < train["rss_after_import_gib"] <= train["peak_gib"]  # a peak is a running maximum
    assert train["speedup_vs_published"] == pytest.approx(2.05 / train["step_s"])
    assert "vs published" in bench_diffusion.describe(train)
    sample = bench_diffusion.run_child({**spec, "name": "sample", "kind": "sample", "sampler": "dpmpp_2m",
                                        "steps": 2, "warmup": False})
    assert sample["volume_s"] == pytest.approx(sample["sample_s"] + sample["decode_s"])
    assert sample["guided_step_s"] == pytest.approx(sample["sample_s"] / 2)
    assert sample["estimated_gib"] > 0 and "synthesis" in bench_diffusion.describe(sample)
