"""The label map is obeyed: a tiny UNet trained on a two-class phantom (each class with its own intensity) with the
real loss, schedule, condition dropout and samplers produces samples whose mean intensity inside each class of a
new label map is the class's training intensity.

The diffusion runs directly on the image (no stage-1 model: label_downsample 1), which is the same code path as
in latent space with an identity autoencoder."""
from __future__ import annotations

import copy

import pytest
import torch

from ddpm.latent_diffusion import denoising_loss, ema_update, sample
from ddpm.samplers import SamplerSettings
from ddpm.schedule import DiffusionSchedule
from ddpm.unet import UNet3D

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (12, 12, 8)
INTENSITY = torch.tensor([-0.6, 0.5])  # class 0, class 1


def phantom_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    """Random boxes of class 1 on class 0, at random places and sizes (so position must come from the label)."""
    labels = torch.zeros(n, 1, *SHAPE, dtype=torch.long)
    for i in range(n):
        size = torch.randint(3, 8, (3,), generator=generator)
        size[2] = min(int(size[2]), 5)
        start = [int(torch.randint(0, s - int(z) + 1, (1,), generator=generator)) for s, z in zip(SHAPE, size)]
        labels[i, 0, start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]] = 1
    return labels


def phantom_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return INTENSITY[labels] + 0.05 * torch.randn(labels.shape, generator=generator)


@pytest.mark.parametrize("decoder", ["spade", "normal"])
def test_samples_follow_the_label_map(decoder):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    unet = UNet3D(in_channels=1, label_nc=2, decoder=decoder, base_channels=16, channel_mult=(1, 2),
                  num_res_blocks=1, attention_levels=(1,), head_channels=16, group_width=8, norm_groups=8,
                  mask_channels=8, mask_hidden_channels=8, spade_hidden_channels=16, label_downsample=(1, 1, 1))
    ema = copy.deepcopy(unet)
    schedule = DiffusionSchedule(timesteps=200, beta_schedule="cosine", prediction="v")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-3)
    losses = []
    for step in range(120):
        labels = phantom_labels(4, gen)
        loss = denoising_loss(unet, schedule, phantom_images(labels, gen), labels, loss="l2", cond_drop_prob=0.1,
                              generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_update(ema, unet, 0.95, step)
        losses.append(float(loss))
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20

    ema.eval()
    test_labels = phantom_labels(4, torch.Generator().manual_seed(123))
    settings = SamplerSettings("dpmpp_2m", 10)
    out = sample(ema, schedule, test_labels, (1, *SHAPE), settings=settings, generator=torch.Generator().manual_seed(1))
    for cls in (0, 1):
        mean = float(out[test_labels == cls].mean())
        assert mean == pytest.approx(float(INTENSITY[cls]), abs=0.1), (decoder, cls, mean)
    # a different label map moves the bright region with it
    shifted = torch.roll(test_labels, shifts=4, dims=2)
    out_shifted = sample(ema, schedule, shifted, (1, *SHAPE), settings=settings,
                         generator=torch.Generator().manual_seed(1))
    assert float(out_shifted[shifted == 1].mean()) > float(out_shifted[shifted == 0].mean()) + 0.7
