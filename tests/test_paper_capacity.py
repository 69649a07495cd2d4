"""The paper-capacity options have the published Med-LSDM code's parameter counts (docs: DESIGN's anchors): the
stage-2 UNet with `model.diffusion.unet.block=resnet` at the paper settings (37 classes), stage 1 with `model=vqgan_paper`,
and the benchmark's VGG16-sized perceptual network. Our defaults keep their own (smaller) counts.

The networks are built on the meta device (shapes only, no memory, no initialisation), as the benchmarks
compose them."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from benchmarks import bench_diffusion, bench_vqgan
from ddpm.unet import UNet3D
from utils.build import build

PUBLISHED_M = {"unet": 37.9, "autoencoder": 1.39, "disc_2d": 2.76, "disc_3d": 11.05, "lpips_vgg": 14.7}
OURS_DEFAULT_M = {"unet": 14.8, "autoencoder": 0.69, "disc_2d": 1.84, "disc_3d": 6.18}
LABEL_NC = 37  # the published code's label classes


def millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def paper_unet(block: str, *overrides: str) -> UNet3D:
    diffusion_cfg, vqgan_cfg = bench_diffusion.compose_configs("paper", [f"model.diffusion.unet.block={block}", *overrides])
    with torch.device("meta"):
        vqgan = build(vqgan_cfg.model.vqgan, "model.vqgan")
        return build(diffusion_cfg.model.diffusion, "model.diffusion", vqgan=vqgan, label_nc=LABEL_NC).unet


@lru_cache(maxsize=None)
def stage1_counts(config: str) -> dict[str, float]:
    cfg = bench_vqgan.compose_config(config, ["model.loss.perceptual_weight=0"])
    with torch.device("meta"):
        vqgan = build(cfg.model.vqgan, "model.vqgan")
        loss = build(cfg.model.loss, "model.loss")
    return {"autoencoder": millions(vqgan), "disc_2d": millions(loss.disc_2d), "disc_3d": millions(loss.disc_3d)}


def test_resnet_block_unet_has_the_published_parameter_count():
    assert millions(paper_unet("resnet")) == pytest.approx(PUBLISHED_M["unet"], rel=0.10)
    assert millions(paper_unet("default")) == pytest.approx(OURS_DEFAULT_M["unet"], rel=0.01)


def test_resnet_kernel_three_cubed_is_the_full_3d_block():
    """(3, 3, 3) triples every block convolution of the in-plane (3, 3, 1) default."""
    def block_conv_weights(net: UNet3D) -> int:
        return sum(m.weight.numel() for name, m in net.named_modules()
                   if isinstance(m, torch.nn.Conv3d) and name.rsplit(".", 1)[-1] in ("conv1", "conv2"))

    full = paper_unet("resnet", "model.diffusion.unet.resnet_kernel=[3,3,3]")
    assert block_conv_weights(full) == 3 * block_conv_weights(paper_unet("resnet"))


@pytest.mark.parametrize("part", ["autoencoder", "disc_2d", "disc_3d"])
def test_stage1_paper_preset_has_the_published_parameter_counts(part):
    assert stage1_counts("paper_widths")[part] == pytest.approx(PUBLISHED_M[part], rel=0.10)
    assert stage1_counts("paper")[part] == pytest.approx(OURS_DEFAULT_M[part], rel=0.01)


def test_benchmark_vgg16_perceptual_network_is_lpips_vgg_sized():
    with torch.device("meta"):
        vgg = bench_vqgan.VGG16Features()
    assert millions(vgg) == pytest.approx(PUBLISHED_M["lpips_vgg"], rel=0.01)
