"""The stage-1 benchmark runs end to end (one timed iteration of a tiny crop) and reports what it promises."""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_vqgan


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_benchmark_reports_step_times_memory_and_codec_times(capsys):
    result = bench_vqgan.main(["--config", "demo", "--device", "cpu", "--steps", "1", "--crop", "16", "16", "16",
                               "--perceptual", "vgg16", "--threads", "1", "--override", "model.vqgan.base_channels=4",
                               "model.loss.disc_channels=4", "model.vqgan.num_codes=32"])
    for key in ("generator_s", "discriminator_s", "voxels_per_s", "encode_one_volume_s", "decode_one_volume_s",
                "peak_rss_gib"):
        assert result[key] > 0, key
    assert result["iteration_s"] == pytest.approx(result["generator_s"] + result["discriminator_s"])
    assert result["perceptual"] == "vgg16" and "speedup_vs_published" not in result  # not the baseline's crop
    assert "per iteration: generator" in capsys.readouterr().out
