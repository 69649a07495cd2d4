"""The CUDA paths (marker `gpu`; `bash benchmarks/gpu_check.sh` runs them, with the CUDA cases of test_bf16.py,
the bf16 autocast training steps of both stages): torch.compile'd networks, DDP over every visible GPU with NCCL,
and sampling and windowed synthesis on CUDA against the CPU. Skipped, with the reason "no CUDA GPU", where torch
sees none.

Tolerances (normalised intensities, [-1, 1]): CUDA in float32 with TF32 off matches the CPU to 1e-3 (max
absolute difference of a synthesised volume; only the order of floating-point sums differs); compiled networks
match eager ones to 1e-3; bf16 synthesis (what `ddpm.sample` runs on a GPU) matches the CPU to a mean absolute
difference of 0.02 (bf16 keeps 8 bits of mantissa).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose
from ddpm_tiny import save_tiny_diffusion, tiny_diffusion
from test_bf16 import VQGAN_TINY, smooth_crop
from utils.paths import PROJECT_ROOT

# A string condition is evaluated at collection, not at import: the DDP test imports this module in a fresh
# process that must not touch CUDA before it forks its ranks.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif("not torch.cuda.is_available()", reason="no CUDA GPU")]

FP32_ATOL = 1e-3
BF16_MEAN_ATOL = 0.02


@contextmanager
def full_float32():
    """CUDA convolutions and matmuls in true float32 (PyTorch allows TF32 for cuDNN convolutions by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_compiled_networks_match_eager():
    model = tiny_diffusion().cuda()
    image, label = (t.cuda() for t in smooth_crop())
    x = torch.randn(2, *model.vqgan.latent_shape((16, 16, 8)), generator=torch.Generator().manual_seed(2)).cuda()
    t = torch.tensor([3, 40], device="cuda")
    condition = model.ema_unet.condition(label.expand(2, -1, -1, -1, -1))
    with torch.no_grad(), full_float32():
        eager = (model.vqgan.encoder(image), model.ema_unet(x, t, condition))
        encoder, unet = torch.compile(model.vqgan.encoder), torch.compile(model.ema_unet)
        compiled = (encoder(image), unet(x, t, condition))
    for a, b in zip(eager, compiled):
        assert torch.isfinite(b).all() and float((a - b).abs().max()) <= FP32_ATOL


def synthesise(ckpt, device: str, window, autocast: bool | None = None) -> np.ndarray:
    from ddpm.checkpoint import load_diffusion
    from ddpm.samplers import SamplerSettings
    from ddpm.synthesis import Synthesizer

    model, meta = load_diffusion(ckpt)
    synth = Synthesizer(model, meta, torch.device(device), window=window, window_overlap=0.5, windows_per_call=2)
    if autocast is not None:
        synth.autocast = autocast
    label = np.zeros((16, 16, 8), dtype=np.int64)  # latent 8x8x4: one window of the crop, or 27 of 4x4x2
    label[3:10, 4:13, 1:6] = 1
    label[7:14, 2:7, 3:7] = 2
    prepared = synth.prepare(label, np.diag([2.0, 2.0, 2.0, 1.0]), "phantom")
    return synth.sample(prepared, settings=SamplerSettings("dpmpp_2m", 8), guidance_scale=1.5,
                        generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("window", [None, [4, 4, 2]], ids=["one window", "windowed"])
def test_synthesis_on_cuda_matches_the_cpu(tmp_path, window):
    ckpt = save_tiny_diffusion(tmp_path / "tiny.ckpt", tiny_diffusion(), modality="mr")
    cpu = synthesise(ckpt, "cpu", window)
    with full_float32():
        cuda = synthesise(ckpt, "cuda", window, autocast=False)
    bf16 = synthesise(ckpt, "cuda", window)  # ddpm.sample's default on GPUs with bf16
    assert cpu.shape == cuda.shape == bf16.shape and np.isfinite(bf16).all() and cpu.std() > 0.01
    assert float(np.abs(cuda - cpu).max()) <= FP32_ATOL
    assert float(np.abs(bf16 - cpu).mean()) <= BF16_MEAN_ATOL


# DDP: a fresh process forks one rank per GPU through tests/ddp_harness.py (the CUDA driver must not have been
# initialised before the fork); each rank trains the stage-1 LightningModule for 3 bf16 steps over NCCL.
def ddp_scenario(rank, out_dir):
    import torch.distributed as dist

    from test_ddp import EQUIVALENCE, FixedCrops, codebook_state, fingerprint, stage_cfg
    from train import common
    from train.lit_vqgan import LitVQGAN

    class Probe(LitVQGAN):
        def on_train_end(self):
            super().on_train_end()
            total = torch.tensor([float(self.global_rank + 1)], device=self.device)
            dist.all_reduce(total)
            self.probe = {"backend": dist.get_backend(), "world": dist.get_world_size(), "sum": float(total),
                          "device": str(self.device)}

    world = int(os.environ["SLURM_NTASKS"])
    cfg = stage_cfg("vqgan", EQUIVALENCE, out_dir, max_steps=3, devices=world)
    cfg.trainer.accelerator, cfg.trainer.strategy, cfg.trainer.precision = "gpu", "ddp", "bf16-mixed"
    lit = Probe(cfg)
    trainer = common.run_training(cfg, lit, FixedCrops(max(1, 4 // world)))
    return {**lit.probe, "step": trainer.global_step, "weights": fingerprint(lit.vqgan.parameters()),
            "codebook": codebook_state(lit), "finite": all(bool(torch.isfinite(p).all()) for p in lit.parameters())}


def run_ddp(world: int, out_dir: str) -> None:
    from ddp_harness import run_tasks

    print(json.dumps(run_tasks({"ddp": ddp_scenario}, world, Path(out_dir), timeout=240)))


def test_ddp_over_every_gpu_with_nccl(tmp_path):
    world = torch.cuda.device_count()
    env = dict(os.environ, PYTORCH_NVML_BASED_CUDA_CHECK="1",
               PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT / "tests"), str(PROJECT_ROOT)]))
    code = f"import test_gpu; test_gpu.run_ddp({world}, {str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [r["ddp"] for r in json.loads(done.stdout.strip().splitlines()[-1])]
    for rank, result in enumerate(ranks):
        assert "error" not in result, result.get("error")
        assert result["backend"] == "nccl" and result["world"] == world and result["device"] == f"cuda:{rank}"
        assert result["sum"] == world * (world + 1) / 2 and result["step"] == 3 and result["finite"]
    assert len({r["weights"] for r in ranks}) == 1  # the ranks stay in step
    assert all(r["codebook"] == ranks[0]["codebook"] for r in ranks)
