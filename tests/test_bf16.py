"""bf16 mixed precision: where `trainer.precision=auto` picks it (utils.device.native_bf16), and bf16 autocast
training steps of both stages lowering the loss, on the CPU (every machine: CPUs without bf16 instructions emulate
it) and on CUDA (marker `gpu`, skipped without a GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose
from ddpm_tiny import tiny_diffusion
from train import common
from utils import device as device_mod

VQGAN_TINY = ["model.vqgan.base_channels=8", "model.vqgan.channel_mult=[1,2]", "model.vqgan.downsample=[2,2,2]",
              "model.vqgan.norm_groups=4", "model.vqgan.num_codes=32", "model.vqgan.embedding_dim=4",
              "model.loss.disc_channels=8", "model.loss.disc_layers=2", "model.loss.perceptual_weight=0",
              "model.vqgan.gradient_checkpointing=false"]
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif("not torch.cuda.is_available()",
                                                                            reason="no CUDA GPU")])]


def smooth_crop(shape=(16, 16, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool3d(torch.randn(1, 1, *(s + 4 for s in shape), generator=g), 5, stride=1)
    image = torch.tanh(3 * smooth)
    return image, (smooth > 0).long() + (smooth > 0.2)


def bf16_outputs(module: torch.nn.Module) -> list:
    """Records the dtype of every Conv3d output (proof that autocast ran the convolutions in bf16)."""
    seen = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv3d):
            layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU lists the given /proc/cpuinfo flags (and that there is no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_flags(*flags):
        monkeypatch.setattr(device_mod, "_cpu_flags", lambda: frozenset(flags))
    return set_flags


@pytest.mark.parametrize("flags, expected", [
    (("avx2", "avx512f", "avx512_bf16"), "bf16-mixed"),  # AMD Zen 4, Intel Cooper Lake
    (("avx512f", "amx_tile", "amx_bf16"), "bf16-mixed"),  # Intel Sapphire Rapids
    (("avx2", "avx512f", "avx512bw"), "32-true"),  # AVX-512 without bf16 (Skylake): emulated, slower
    (("avx2", "fma"), "32-true"),  # AMD Zen 1-3
    ((), "32-true"),  # no /proc/cpuinfo (macOS, Windows)
])
def test_precision_auto_is_bf16_only_where_the_cpu_has_bf16_instructions(cpu_flags, flags, expected):
    cpu_flags(*flags)
    assert device_mod.native_bf16(torch.device("cpu")) == (expected == "bf16-mixed")
    for accelerator in ("auto", "cpu", "gpu"):  # no GPU here: every accelerator trains on the CPU
        assert common.resolve_precision("auto", accelerator) == expected
    assert common.resolve_precision("32-true", "cpu") == "32-true"  # an explicit precision is kept
    assert common.resolve_precision("16-mixed") == "16-mixed"


def test_cpu_flags_are_read_from_the_first_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert device_mod._cpu_flags.__wrapped__(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"  # an ARM kernel names them Features: none read
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert device_mod._cpu_flags.__wrapped__(str(arm)) == frozenset()
    assert device_mod._cpu_flags.__wrapped__(str(tmp_path / "absent")) == frozenset()


@pytest.mark.parametrize("device", DEVICES)
def test_stage1_bf16_training_steps_lower_the_loss(device):
    from utils.build import build
    from vq_gan_3d.training import training_iteration

    cfg = compose("vqgan", [*VQGAN_TINY, "model.loss.gan_start_step=12"])
    torch.manual_seed(0)
    vqgan, loss = build(cfg.model.vqgan, "model.vqgan").to(device), build(cfg.model.loss, "model.loss").to(device)
    opt_g = torch.optim.Adam(vqgan.parameters(), lr=3e-3)
    opt_d = torch.optim.Adam([p for d in loss.discriminators() for p in d.parameters()], lr=1e-3)
    image, label = (t.to(device) for t in smooth_crop())
    dtypes = bf16_outputs(vqgan)
    l1, finite = [], []
    for step in range(16):  # GAN on from step 12: the discriminator's bf16 step runs too
        with torch.autocast(device, dtype=torch.bfloat16):
            logs = training_iteration(vqgan=vqgan, loss=loss, opt_g=opt_g, opt_d=opt_d, image=image, label=label,
                                      step=step, generator=torch.Generator().manual_seed(0), grad_clip=1.0)
        l1.append(float(logs["train/l1"]))
        finite += [bool(torch.isfinite(torch.as_tensor(v)).all()) for v in logs.values()]
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in vqgan.parameters())  # autocast: the weights stay float32
    assert all(finite) and "train/d_loss" in logs
    assert l1[11] < 0.7 * l1[0], l1  # reconstruction of the fixed crop improves before the GAN starts


@pytest.mark.parametrize("device", DEVICES)
def test_stage2_bf16_training_steps_lower_the_loss(device):
    from ddpm.latent_diffusion import denoising_loss, make_optimizer

    model = tiny_diffusion().to(device).train()
    x0 = torch.randn(2, *model.vqgan.latent_shape((16, 16, 8)), generator=torch.Generator().manual_seed(0)).to(device)
    label = torch.randint(0, 3, (2, 1, 16, 16, 8), generator=torch.Generator().manual_seed(1)).to(device)
    optimizer = make_optimizer(model.unet, lr=2e-3, weight_decay=0.0)
    dtypes = bf16_outputs(model.unet)
    losses = []
    for step in range(12):  # the same timesteps and noise every step: a fixed objective
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = denoising_loss(model.unet, model.schedule, x0, label, loss="l2", cond_drop_prob=0.0,
                                  generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_ema(step)
        losses.append(float(loss))
    assert torch.bfloat16 in dtypes and loss.dtype == torch.float32
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses
