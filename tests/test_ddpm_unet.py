"""The stage-2 UNet and its label conditioning on tiny inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpm.conditioning import LatentMaskCompressor, PatchEmbedding, drop_labels, onehot_on_grid
from ddpm.unet import UNet3D

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=16,
            group_width=8, norm_groups=8, mask_channels=8, mask_hidden_channels=8, spade_hidden_channels=8)


def tiny_unet(decoder: str, **overrides) -> UNet3D:
    torch.manual_seed(0)
    net = UNet3D(in_channels=3, label_nc=4, decoder=decoder, label_downsample=(2, 2, 2), **{**TINY, **overrides})
    # Zero-initialised output layers make a fresh network ignore its inputs; give them weights.
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05)
    return net.eval()


def labels(seed: int, batch: int = 2, shape=(8, 8, 4), nc: int = 4) -> torch.Tensor:
    return torch.randint(0, nc, (batch, 1, *shape), generator=torch.Generator().manual_seed(seed))


def test_patch_embedding_is_a_strided_conv_over_the_one_hot_map():
    torch.manual_seed(0)
    embed = PatchEmbedding(num_classes=5, out_channels=3, patch=(2, 2, 1))
    label = labels(1, shape=(6, 4, 3), nc=5)
    onehot = F.one_hot(label[:, 0], 5).movedim(-1, 1).float()
    # weight rows are (offset, class); a conv kernel is (out, class, kx, ky, kz) with offsets in x, y, z order
    kernel = embed.weight.detach().reshape(2, 2, 1, 5, 3).permute(4, 3, 0, 1, 2)
    kernel.requires_grad_()
    expected = F.conv3d(onehot, kernel, embed.bias.detach(), stride=(2, 2, 1))
    out = embed(label)
    torch.testing.assert_close(out, expected)
    # and its weight gradient is the conv's (the backward is written by hand)
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * upstream).sum(), embed.weight)
    (conv_grad,) = torch.autograd.grad((expected * upstream).sum(), kernel)
    torch.testing.assert_close(grad, conv_grad.permute(2, 3, 4, 1, 0).reshape_as(grad))


def test_onehot_on_grid_is_the_area_average_of_the_one_hot_map():
    label = labels(2, shape=(8, 4, 4), nc=3)
    expected = F.avg_pool3d(F.one_hot(label[:, 0], 3).movedim(-1, 1).float(), (4, 2, 2))
    torch.testing.assert_close(onehot_on_grid(label, 3, (4, 2, 2)), expected)


def test_mask_compressor_reaches_the_latent_grid():
    compressor = LatentMaskCompressor(num_classes=5, out_channels=6, hidden_channels=4, downsample=(4, 4, 2))
    assert compressor(labels(0, shape=(16, 8, 8), nc=5)).shape == (2, 6, 4, 2, 4)


@pytest.mark.parametrize("decoder,block", [("spade", "default"), ("normal", "default"), ("spade", "resnet"),
                                           ("normal", "resnet")])
def test_shapes_and_label_dependence(decoder, block):
    net = tiny_unet(decoder, block=block)
    x = torch.randn(2, 3, 4, 4, 2)
    t = torch.tensor([3, 500])
    with torch.no_grad():
        label_a, label_b = labels(0), labels(1)
        out_a = net(x, t, net.condition(label_a))
        out_b = net(x, t, net.condition(label_b))
        out_null = net(x, t, net.null_condition(label_a))
    assert out_a.shape == x.shape
    assert (out_a - out_b).abs().mean() > 1e-3, "changing the label map must change the prediction"
    assert (out_a - out_null).abs().mean() > 1e-3, "the null condition must differ from a label"
    # sample 1's label alone changes only sample 1's prediction
    mixed = torch.cat([label_a[:1], label_b[1:]])
    with torch.no_grad():
        out_mixed = net(x, t, net.condition(mixed))
    torch.testing.assert_close(out_mixed[0], out_a[0])
    torch.testing.assert_close(out_mixed[1], out_b[1])


@pytest.mark.parametrize("block,norms_per_block", [("default", 1), ("resnet", 2)])
def test_cached_spade_maps_give_the_same_prediction_and_are_reused(block, norms_per_block):
    net = tiny_unet("spade", block=block)
    x = torch.randn(2, 3, 4, 4, 2)
    label = labels(3)
    with torch.no_grad():
        plain = net(x, torch.tensor([10, 10]), net.condition(label))
        condition = net.condition(label, cache=True)
        first = net(x, torch.tensor([10, 10]), condition)
        n_maps = len(condition.spade_cache)
        again = net(x, torch.tensor([10, 10]), condition)
    # middle blocks + decoder blocks (num_res_blocks + 1 per level, 2 levels), each with its label-aware norms
    assert n_maps == (2 + 2 * 2) * norms_per_block
    assert len(condition.spade_cache) == n_maps
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain)


def test_batched_guidance_condition_matches_separate_passes():
    net = tiny_unet("spade")
    x = torch.randn(2, 3, 4, 4, 2)
    label = labels(4)
    t = torch.tensor([7, 7])
    with torch.no_grad():
        cond = net(x, t, net.condition(label))
        uncond = net(x, t, net.null_condition(label))
        both = net.condition(label, cache=True).concat(net.null_condition(label, cache=True))
        batched = net(torch.cat([x, x]), torch.cat([t, t]), both)
    torch.testing.assert_close(batched, torch.cat([cond, uncond]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", ["default", "resnet"])
def test_gradient_checkpointing_gives_the_same_gradients(block):
    x = torch.randn(2, 3, 4, 4, 2)
    label = labels(5)
    grads = []
    for checkpointing in (False, True):
        net = tiny_unet("spade", block=block, gradient_checkpointing=checkpointing).train()
        net(x, torch.tensor([1, 2]), net.condition(label)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_resnet_block_learns_a_label_dependent_target():
    """Forward and backward through the resnet-block UNet: a few Adam steps fit a target that differs per label
    map, so the fit has to use the SPADE conditioning."""
    net = tiny_unet("spade", block="resnet").train()
    x = torch.randn(2, 3, 4, 4, 2, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([5, 5])
    label = torch.cat([labels(7, batch=1), labels(8, batch=1)])
    target = torch.stack([torch.full((3, 4, 4, 2), 0.5), torch.full((3, 4, 4, 2), -0.5)])
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = (net(x[:1].expand(2, -1, -1, -1, -1), t, net.condition(label)) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    # the input latent is the same for both samples: only the label maps tell the targets apart
    assert losses[-1] < 0.1 * losses[0]


def test_attention_levels_and_sizes_are_checked():
    net = tiny_unet("normal")
    assert net.required_multiple == 2
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 3, 3, 4, 2), torch.tensor([0]), net.condition(labels(0, 1, (6, 8, 4))))
    with pytest.raises(ValueError, match="attention_levels"):
        UNet3D(in_channels=3, label_nc=4, **{**TINY, "attention_levels": (2,)})
    with pytest.raises(ValueError, match="decoder"):
        UNet3D(in_channels=3, label_nc=4, decoder="film", **TINY)
    with pytest.raises(ValueError, match="block"):
        UNet3D(in_channels=3, label_nc=4, block="convnext", **TINY)
    with pytest.raises(ValueError, match="resnet_kernel"):
        UNet3D(in_channels=3, label_nc=4, block="resnet", resnet_kernel=(3, 2, 1), **TINY)


def test_condition_dropout_rate():
    label = torch.zeros(20000, 1, 2, 2, 2, dtype=torch.long)
    dropped = drop_labels(label, 4, 0.1, generator=torch.Generator().manual_seed(0))
    is_null = (dropped == 4).flatten(1)
    assert bool((is_null.all(1) | (~is_null).all(1)).all()), "a label map is dropped whole or not at all"
    assert float(is_null.all(1).float().mean()) == pytest.approx(0.1, abs=0.007)
    assert drop_labels(label, 4, 0.0) is label
