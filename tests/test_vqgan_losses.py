"""Stage-1 losses: perceptual backbones (and their start-up errors), discriminators, hinge and feature-matching
terms, slice sampling, and the single discriminator pass shared by the generator and discriminator updates."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import compose
from utils.build import build
from utils.errors import UserError
from vq_gan_3d.discriminators import PatchDiscriminator
from vq_gan_3d.losses import (VQGANLoss, feature_matching_loss, hinge_d_loss, hinge_g_loss, lesion_l1, random_slice_index,
                              sample_slices)
from vq_gan_3d.model import VQGAN
from vq_gan_3d.perceptual import PerceptualLoss
from vq_gan_3d.training import training_iteration


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to other processes holding the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def smooth_volume(batch=2, shape=(16, 16, 8), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, *(s + 4 for s in shape), generator=g)
    return torch.tanh(2 * nn.functional.avg_pool3d(noise, 5, stride=1))


def tiny_loss(**overrides) -> VQGANLoss:
    settings = dict(l1_weight=1.0, perceptual_weight=0.0, perceptual_backbone="inception", perceptual_path=None,
                    slices_per_volume=2, gan_start_step=0, gan_weight_2d=1.0, gan_weight_3d=1.0, feature_matching_weight=2.0,
                    disc_channels=4, disc_layers=2)
    return VQGANLoss(**{**settings, **overrides})


# -- perceptual -------------------------------------------------------------------------------------------------

def test_inception_perceptual_loss_is_zero_for_identical_slices_and_trains_the_fake():
    loss = PerceptualLoss(backbone="inception")
    real = smooth_volume(4, (32, 32, 1))[..., 0]
    fake = (real + 0.3 * torch.randn_like(real)).requires_grad_()
    assert float(loss(real, real)) == pytest.approx(0.0, abs=1e-6)
    value = loss(real, fake)
    value.backward()
    assert float(value) > 0 and fake.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    assert float(loss(real, real + 0.1 * torch.randn_like(real))) < float(value)


class TinyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]


class TinyDistance(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean(dim=(1, 2, 3))


def test_user_torchscript_backbones(tmp_path):
    features_path, distance_path = tmp_path / "vgg_like.pt", tmp_path / "lpips_like.pt"
    torch.jit.save(torch.jit.script(TinyFeatures()), str(features_path))
    torch.jit.save(torch.jit.script(TinyDistance()), str(distance_path))
    real, fake = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    features = PerceptualLoss(backbone="torchscript", path=str(features_path))
    assert float(features(real, real)) == pytest.approx(0.0, abs=1e-6) and float(features(real, fake)) > 0
    distance = PerceptualLoss(backbone="torchscript", path=str(distance_path))
    assert float(distance(real, fake)) == pytest.approx(float((real - fake).abs().mean()), rel=1e-5)


def test_medicalnet_backbone_from_a_weights_file(tmp_path):
    from monai.networks.nets import resnet10

    net = resnet10(spatial_dims=3, n_input_channels=1, shortcut_type="B", bias_downsample=False,
                   feed_forward=False)
    path = tmp_path / "resnet_10_23dataset.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loss = PerceptualLoss(backbone="medicalnet", path=str(path))
    assert not loss.on_slices
    real = smooth_volume(1, (16, 16, 16))
    fake = (real + 0.2 * torch.randn_like(real)).requires_grad_()
    value = loss(real, fake)
    value.backward()
    assert float(value) > 0 and fake.grad.abs().sum() > 0

    bad = tmp_path / "not_medicalnet.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="match no MedicalNet"):
        PerceptualLoss(backbone="medicalnet", path=str(bad))


def test_a_missing_perceptual_backbone_stops_at_start_up(tmp_path):
    base = compose("vqgan", ["model.loss.gan_weight_2d=0", "model.loss.gan_weight_3d=0"]).model.loss
    for backbone, path in [("torchscript", tmp_path / "vgg.pt"), ("medicalnet", tmp_path / "resnet_10.pth"),
                           ("inception", tmp_path / "inception.pt")]:
        cfg = compose("vqgan", [f"model.loss.perceptual_backbone={backbone}",
                                f"model.loss.perceptual_path={path}"]).model.loss
        with pytest.raises(UserError, match="not found"):
            build(cfg, "model.loss")
    with pytest.raises(UserError, match="needs a file path"):
        build(compose("vqgan", ["model.loss.perceptual_backbone=medicalnet"]).model.loss, "model.loss")
    with pytest.raises(UserError, match="unknown backbone"):
        build(compose("vqgan", ["model.loss.perceptual_backbone=alexnet"]).model.loss, "model.loss")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a loadable TorchScript"):
        build(compose("vqgan", ["model.loss.perceptual_backbone=torchscript",
                                     f"model.loss.perceptual_path={broken}"]).model.loss, "model.loss")
    # weight 0: the backbone is never loaded, so a missing file is no error
    off = compose("vqgan", ["model.loss.perceptual_weight=0", "model.loss.perceptual_backbone=medicalnet",
                            f"model.loss.perceptual_path={tmp_path / 'absent.pth'}"]).model.loss
    assert build(off, "model.loss").perceptual is None
    assert build(base, "model.loss").perceptual is not None  # the default: Inception-v3 from the fid-helper wheel


# -- discriminators and GAN terms ---------------------------------------------------------------------------

def test_discriminators_use_instance_norm_and_fit_small_inputs():
    for dims, shape in [(2, (3, 1, 16, 16)), (3, (2, 1, 16, 16, 8)), (3, (1, 1, 16, 16, 16))]:
        disc = PatchDiscriminator(spatial_dims=dims, channels=8, n_layers=3)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
        logits, features = disc(torch.randn(*shape))
        assert logits.shape[:2] == (shape[0], 1) and len(features) == 4


def test_hinge_and_feature_matching_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # mean(relu(1 - real)) = (0 + 0.5 + 2) / 3; mean(relu(1 + fake)) = (0 + 1 + 2.5) / 3
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert float(hinge_g_loss(fake)) == pytest.approx(0.5 / 3)  # -mean(fake)
    feats_real, feats_fake = [torch.zeros(2, 3), torch.ones(4)], [torch.ones(2, 3), torch.ones(4) * 3]
    assert float(feature_matching_loss(feats_real, feats_fake)) == pytest.approx((1.0 + 2.0) / 2)


def test_slice_sampling_takes_the_same_distinct_z_slices_from_real_and_fake():
    volumes = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 4, 6)
    index = random_slice_index(2, 6, 3, torch.Generator().manual_seed(0))
    assert index.shape == (2, 3) and all(len(set(row.tolist())) == 3 for row in index)
    slices = sample_slices(volumes, index)
    assert slices.shape == (6, 1, 4, 4)
    for b in range(2):
        for j in range(3):
            assert torch.equal(slices[b * 3 + j, 0], volumes[b, 0, :, :, index[b, j]])
    assert random_slice_index(1, 4, 10, torch.Generator()).shape == (1, 4)


def test_one_discriminator_pass_gives_the_gradients_of_the_usual_two_pass_update():
    torch.manual_seed(0)
    loss = tiny_loss()
    reference = copy.deepcopy(loss)
    real = smooth_volume(2)
    weight = nn.Parameter(torch.tensor(0.7))
    fake = weight * smooth_volume(2, seed=1)
    commitment = torch.zeros(())

    total, terms, passes = loss.generator_loss(real, fake, {"commitment": commitment}, step=5,
                                               generator=torch.Generator().manual_seed(3))
    d_total, _ = loss.discriminator_loss(passes)
    disc_params = [p for d in loss.discriminators() for p in d.parameters()]
    d_grads = torch.autograd.grad(d_total, disc_params, retain_graph=True)
    (g_grad,) = torch.autograd.grad(total, [weight], retain_graph=True)

    # the usual way: D on real and on detached fakes for D; D on fakes (and real, no grad) again for G
    index = random_slice_index(2, real.shape[-1], 2, torch.Generator().manual_seed(3))
    pairs = [(reference.disc_2d, sample_slices(real, index), sample_slices(fake, index)),
             (reference.disc_3d, real, fake)]
    ref_d, ref_g = 0.0, nn.functional.l1_loss(fake, real)
    for disc, r, f in pairs:
        logits_real, feats_real = disc(r)
        logits_fake_detached, _ = disc(f.detach())
        ref_d = ref_d + hinge_d_loss(logits_real, logits_fake_detached)
        logits_fake, feats_fake = disc(f)
        ref_g = ref_g + hinge_g_loss(logits_fake) + 2.0 * feature_matching_loss(
            [x.detach() for x in feats_real], feats_fake)
    ref_disc_params = [p for d in reference.discriminators() for p in d.parameters()]
    for ours, theirs in zip(d_grads, torch.autograd.grad(ref_d, ref_disc_params, retain_graph=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_grad, torch.autograd.grad(ref_g, [weight])[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(total, ref_g, rtol=1e-5, atol=1e-6)


def test_training_iteration_updates_the_discriminators_only_once_the_gan_is_on():
    torch.manual_seed(0)
    vqgan = VQGAN(base_channels=4, channel_mult=(1, 2), downsample=(2, 2, 2), num_codes=16, embedding_dim=4,
                  norm_groups=2)
    loss = tiny_loss(gan_start_step=1)
    opt_g = torch.optim.Adam(vqgan.parameters(), lr=1e-3)
    disc_params = [p for d in loss.discriminators() for p in d.parameters()]
    opt_d = torch.optim.Adam(disc_params, lr=1e-3)
    image = smooth_volume(2)

    def snapshot(params):
        return [p.detach().clone() for p in params]

    for step, gan_on in [(0, False), (1, True)]:
        g_before, d_before = snapshot(vqgan.parameters()), snapshot(disc_params)
        logs = training_iteration(vqgan=vqgan, loss=loss, opt_g=opt_g, opt_d=opt_d, image=image, label=None,
                                  step=step, generator=torch.Generator().manual_seed(step), grad_clip=1.0)
        assert any(not torch.equal(a, b) for a, b in zip(g_before, vqgan.parameters()))
        d_changed = any(not torch.equal(a, b) for a, b in zip(d_before, disc_params))
        assert d_changed == gan_on
        assert ("train/d_loss" in logs) == gan_on and ("train/g_adv_3d" in logs) == gan_on
        assert all(p.grad is None for p in [*vqgan.parameters(), *disc_params])  # freed after the steps


# -- lesion-weighted reconstruction ----------------------------------------------------------------------------

def test_lesion_l1_is_the_error_over_lesion_voxels_alone():
    real = torch.zeros(2, 1, 8, 8, 4)
    fake = torch.full_like(real, 0.5)
    mask = torch.zeros_like(real, dtype=torch.bool)
    mask[0, 0, 2:4, 2:4, 1:3] = True
    fake[mask] = 2.0
    assert float(lesion_l1(real, fake, mask)) == pytest.approx(2.0)
    assert float(lesion_l1(real, fake, torch.zeros_like(mask))) == 0.0  # no lesion in the batch: no term


def test_lesion_l1_weight_adds_its_term_and_pulls_lesion_voxels_harder():
    real, mask = smooth_volume(), torch.zeros(2, 1, 16, 16, 8, dtype=torch.bool)
    mask[0, 0, 4:7, 4:7, 2:5] = True
    fake = (real + 0.2).requires_grad_()
    g = torch.Generator().manual_seed(0)
    plain, plain_terms, _ = tiny_loss(gan_start_step=10).generator_loss(real, fake, {}, 0, g, lesion_mask=mask)
    weighted, terms, _ = tiny_loss(gan_start_step=10, lesion_l1_weight=3.0).generator_loss(
        real, fake, {}, 0, g, lesion_mask=mask)
    assert "lesion_l1" not in plain_terms and float(terms["lesion_l1"]) == pytest.approx(0.2, rel=1e-5)
    assert float(weighted - plain) == pytest.approx(3.0 * 0.2, rel=1e-5)
    (grad,) = torch.autograd.grad(weighted, fake)
    assert float(grad[mask].abs().mean()) > 100 * float(grad[~mask].abs().mean())
