"""The other two stage-1 latent kinds, FSQ and a KL-regularised continuous latent, and what every kind shares:
the config choice, the loss's regulariser, checkpoints that store the kind, and stage 2 over each kind."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from ddpm.checkpoint import load_diffusion
from ddpm.latent_diffusion import LatentDiffusion
from ddpm.samplers import SamplerSettings
from ddpm_tiny import TINY_UNET, save_tiny_diffusion
from utils.build import build
from utils.errors import UserError
from vq_gan_3d.checkpoint import load_vqgan, save_vqgan
from vq_gan_3d.fsq import FiniteScalarQuantizer
from vq_gan_3d.kl import GaussianLatent
from vq_gan_3d.losses import VQGANLoss
from vq_gan_3d.model import KINDS, VQGAN
from vq_gan_3d.training import training_iteration

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vqgan(kind: str, label_nc: int | None = None, seed: int = 0) -> VQGAN:
    """x2 per axis; 4 latent channels for every kind (fsq: levels [8, 5, 5, 3]); initialised by one batch."""
    torch.manual_seed(seed)
    dim = dict(fsq_levels=[8, 5, 5, 3]) if kind == "fsq" else dict(embedding_dim=4)
    vqgan = VQGAN(base_channels=8, channel_mult=(1, 2), downsample=(2, 2, 2), quantizer=kind, num_codes=32,
                  norm_groups=4, label_nc=label_nc, spade_hidden=4, **dim).train()
    label = torch.randint(0, label_nc, (2, 1, 8, 8, 8)) if label_nc else None
    vqgan(torch.rand(2, 1, 8, 8, 8) * 2 - 1, label)
    return vqgan.eval().requires_grad_(False)


def smooth_images(n: int = 2, shape=(8, 8, 8), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, *(s + 4 for s in shape), generator=g)
    return torch.tanh(2 * torch.nn.functional.avg_pool3d(noise, 5, stride=1))


# -- FSQ ----------------------------------------------------------------------------------------------------------

def test_fsq_bounds_each_channel_to_its_levels():
    q = FiniteScalarQuantizer(levels=[8, 5])
    h = torch.tensor([[-50.0, 0.0, 50.0], [-50.0, 0.0, 50.0]]).view(1, 2, 3, 1, 1)
    z = q.latent(h)
    z_q, _ = q.eval().quantize(z)
    # 8 levels: -4..3 over 4; 5 levels: -2..2 over 2; 0 maps to the middle level
    torch.testing.assert_close(z_q[0].flatten(1), torch.tensor([[-1.0, 0.0, 0.75], [-1.0, 0.0, 1.0]]))
    assert float(z.abs().max()) <= 1.0 + 2e-3  # the latent stage 2 diffuses is bounded (tanh with a 0.1 % margin)
    # any value (a diffusion sample, say) maps to a valid code
    far, _ = q.quantize(torch.tensor([7.0, -7.0]).view(1, 2, 1, 1, 1))
    torch.testing.assert_close(far.flatten(), torch.tensor([0.75, -1.0]))


def test_fsq_implicit_codebook_round_trips_every_index():
    q = FiniteScalarQuantizer(levels=[8, 5, 3]).eval()
    indices = torch.arange(q.num_codes).view(1, -1, 1, 1)
    codes = q.lookup(indices)
    assert codes.shape == (1, 3, q.num_codes, 1, 1) and torch.unique(codes.flatten(2), dim=2).shape[2] == 120
    z_q, info = q.quantize(codes)  # codes are fixed points of the quantiser
    torch.testing.assert_close(z_q, codes)
    assert torch.equal(info["indices"], indices)
    # mixed radix: index = d0 + 8 d1 + 40 d2 with d the level's position; the last index has every top level
    torch.testing.assert_close(codes[0, :, -1].flatten(), torch.tensor([3 / 4, 2 / 2, 1 / 1]))
    torch.testing.assert_close(codes[0, :, 0].flatten(), torch.tensor([-1.0, -1.0, -1.0]))


def test_fsq_rounding_passes_gradients_straight_through():
    q = FiniteScalarQuantizer(levels=[8, 5, 5, 5]).train()
    z = (torch.rand(2, 4, 3, 3, 3) * 2 - 1).requires_grad_()
    weights = torch.randn(2, 4, 3, 3, 3)
    z_q, info = q.quantize(z)
    (z_q * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)
    assert info["regularizer"] == {}


def test_fsq_usage_and_level_usage_over_the_window():
    q = FiniteScalarQuantizer(levels=[4, 3], usage_window=3).train()
    every_code = q.lookup(torch.arange(12).view(1, 12, 1, 1))
    _, info = q.quantize(every_code)
    stats = {k: float(v) for k, v in info["stats"].items()}
    assert stats == pytest.approx({"perplexity": 12.0, "codebook_usage": 1.0, "level_usage": 1.0})
    one_code = q.lookup(torch.zeros(1, 1, 1, 1, dtype=torch.long))
    usage = [float(q.quantize(one_code)[1]["stats"]["codebook_usage"]) for _ in range(3)]
    # the full batch ages out of the 3-step window at the third step after it
    assert usage == pytest.approx([1.0, 1.0, 1 / 12])
    assert float(q.quantize(one_code)[1]["stats"]["level_usage"]) == pytest.approx(2 / 7)  # 1 of 4, 1 of 3
    assert float(q.quantize(one_code)[1]["stats"]["perplexity"]) == pytest.approx(1.0)
    before = q.last_used.clone()
    q.eval()(torch.randn(1, 2, 4, 4, 4))
    assert torch.equal(q.last_used, before)  # statistics change only in training


# -- KL -----------------------------------------------------------------------------------------------------------

def test_kl_value_of_a_known_posterior():
    latent = GaussianLatent(embedding_dim=2, kl_weight=0.01).eval()
    mean, logvar = 0.5, math.log(0.25)
    h = torch.cat([torch.full((3, 2, 4, 4, 2), mean), torch.full((3, 2, 4, 4, 2), logvar)], dim=1)
    z, info = latent(h)
    per_element = 0.5 * (mean**2 + 0.25 - 1 - logvar)
    torch.testing.assert_close(z, h[:, :2])  # the mean outside training
    assert float(info["stats"]["kl_per_element"]) == pytest.approx(per_element, rel=1e-5)
    # summed over a volume's 64 latent elements, averaged over the batch, times the weight
    assert float(info["regularizer"]["kl"]) == pytest.approx(0.01 * 64 * per_element, rel=1e-5)
    zero = latent(torch.zeros(1, 4, 2, 2, 2))[1]["regularizer"]["kl"]
    assert float(zero) == 0.0  # the standard normal itself


def test_kl_training_samples_by_reparameterisation_reproducibly():
    latent = GaussianLatent(embedding_dim=2).train()
    h = torch.cat([torch.full((2, 2, 16, 16, 16), 0.3), torch.full((2, 2, 16, 16, 16), math.log(0.25))], dim=1)
    h.requires_grad_()
    z, _ = latent(h)
    noise = (z - 0.3).detach()
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.02) and float(noise.std()) == pytest.approx(0.5, rel=0.03)
    z.sum().backward()
    torch.testing.assert_close(h.grad[:, :2], torch.ones_like(z))  # dz/dmean = 1
    torch.testing.assert_close(h.grad[:, 2:], 0.5 * noise)  # dz/dlogvar = std * eps / 2
    # the noise is a function of the update count: a copy resumed at the same count draws the same sample
    resumed = GaussianLatent(embedding_dim=2).train()
    resumed.load_state_dict({"num_updates": torch.tensor(0)})
    torch.testing.assert_close(resumed(h)[0], z)
    assert int(latent.num_updates) == 1 and not torch.equal(latent(h)[0], z)


def test_kl_encoder_outputs_mean_and_log_variance_and_encode_gives_the_mean():
    vqgan = tiny_vqgan("kl")
    image = smooth_images()
    assert vqgan.encoder.conv_out.out_channels == 8 and vqgan.latent_shape((8, 8, 8)) == (4, 4, 4, 4)
    torch.testing.assert_close(vqgan.encode(image), vqgan.encoder(image)[:, :4])
    recon, _ = vqgan(image)  # eval: decodes the mean
    torch.testing.assert_close(recon, vqgan.decode(vqgan.encode(image)))


# -- every kind -----------------------------------------------------------------------------------------------------

def test_the_loss_adds_the_kinds_regulariser_as_it_is():
    loss = VQGANLoss(l1_weight=2.0, perceptual_weight=0.0, perceptual_backbone="inception", perceptual_path=None,
                     slices_per_volume=1, gan_start_step=10, gan_weight_2d=0.0, gan_weight_3d=0.0,
                     feature_matching_weight=0.0, disc_channels=4, disc_layers=2)
    real, fake = smooth_images(seed=1), smooth_images(seed=2)
    l1 = float(torch.nn.functional.l1_loss(fake, real))
    for regularizer in ({}, {"kl": torch.tensor(0.3)}, {"commitment": torch.tensor(0.05)}):
        total, terms, _ = loss.generator_loss(real, fake, regularizer, 0, torch.Generator())
        assert float(total) == pytest.approx(2.0 * l1 + sum(float(v) for v in regularizer.values()), rel=1e-6)
        assert set(terms) == {"l1", *regularizer}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_through_the_shared_iteration_and_reconstructs_better(kind):
    torch.manual_seed(0)
    dim = dict(fsq_levels=[8, 8, 5, 5]) if kind == "fsq" else dict(embedding_dim=4)
    vqgan = VQGAN(base_channels=8, channel_mult=(1, 2), downsample=(2, 2, 2), quantizer=kind, num_codes=64,
                  norm_groups=4, **dim).train()
    loss = VQGANLoss(l1_weight=1.0, perceptual_weight=0.0, perceptual_backbone="inception", perceptual_path=None,
                     slices_per_volume=1, gan_start_step=10**6, gan_weight_2d=0.0, gan_weight_3d=0.0,
                     feature_matching_weight=0.0, disc_channels=4, disc_layers=2)
    opt = torch.optim.Adam(vqgan.parameters(), lr=3e-3)
    image = smooth_images(n=1)
    l1 = []
    for step in range(40):
        logs = training_iteration(vqgan=vqgan, loss=loss, opt_g=opt, opt_d=None, image=image, label=None,
                                  step=step, generator=torch.Generator().manual_seed(step), grad_clip=1.0)
        l1.append(float(logs["train/l1"]))
    assert l1[-1] < l1[0] / 4, (l1[0], l1[-1])
    expected = {"ema_vq": {"train/commitment", "train/perplexity", "train/codebook_usage", "train/codes_restarted"},
                "fsq": {"train/perplexity", "train/codebook_usage", "train/level_usage"},
                "kl": {"train/kl", "train/kl_per_element", "train/posterior_std"}}[kind]
    assert expected <= set(logs)


@pytest.mark.parametrize("kind", KINDS)
def test_the_config_chooses_the_kind_and_the_checkpoint_stores_it(kind, tmp_path):
    cfg = compose("vqgan", [f"model.vqgan.quantizer={kind}", "model.vqgan.base_channels=4",
                            "model.vqgan.channel_mult=[1,2]", "model.vqgan.downsample=[2,2,2]",
                            "model.vqgan.norm_groups=2", "model.vqgan.num_codes=32", "model.vqgan.embedding_dim=4"])
    built = build(cfg.model.vqgan, "model.vqgan")
    assert built.kind == kind and built.hparams["embedding_dim"] == 4
    assert {"ema_vq": "num_codes", "fsq": "fsq_levels", "kl": "kl_weight"}[kind] in built.hparams
    vqgan = tiny_vqgan(kind)
    path = save_vqgan(vqgan, tmp_path / "vqgan.ckpt")
    loaded = load_vqgan(path)
    assert loaded.kind == kind and loaded.hparams == vqgan.hparams
    image = smooth_images()
    torch.testing.assert_close(loaded.decode(loaded.encode(image)), vqgan.decode(vqgan.encode(image)))


def test_an_unknown_kind_is_a_user_error():
    cfg = compose("vqgan", ["model.vqgan.quantizer=vqvae"])
    with pytest.raises(UserError, match=r"^model.vqgan: quantizer must be one of \['ema_vq', 'fsq', 'kl'\]"):
        build(cfg.model.vqgan, "model.vqgan")


def diffusion_over(kind: str) -> LatentDiffusion:
    torch.manual_seed(1)
    model = LatentDiffusion(vqgan=tiny_vqgan(kind), label_nc=3, unet=dict(TINY_UNET), timesteps=50,
                            beta_schedule="cosine", prediction="v", loss="l2", cond_drop_prob=0.1, ema_decay=0.9)
    with torch.no_grad():  # a fresh UNet's output layer is zero: let predictions depend on the inputs
        for p in list(model.unet.parameters()) + list(model.ema_unet.parameters()):
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_stage2_trains_samples_and_round_trips_over_each_kind(kind, tmp_path):
    model = diffusion_over(kind)
    image = smooth_images(n=2)
    label = (image > 0).long() + (image > 0.5).long()
    z = model.encode_unscaled(image)
    model.set_scale_factor_from(float(z.mean()), float(z.square().mean()))
    model.train()
    opt = torch.optim.Adam(model.unet.parameters(), lr=3e-3)

    def fixed_loss():
        return model.training_loss(image, label, generator=torch.Generator().manual_seed(0))

    first = float(fixed_loss())
    for _ in range(15):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    assert float(fixed_loss()) < 0.8 * first
    model.eval()
    latent = model.sample_latent(label, settings=SamplerSettings("ddim", 2, 0.0),
                                 generator=torch.Generator().manual_seed(0))
    decoded = model.decode(latent, label)
    # the sample is decoded through the kind's quantisation: a code of the codebook, a rounded level, or as it is
    z_q, _ = model.vqgan.quantize(latent / model.scale_factor)
    if kind != "kl":
        torch.testing.assert_close(z_q, model.vqgan.quantizer.lookup(model.vqgan.quantize(z_q)[1]["indices"]))
    torch.testing.assert_close(decoded, model.vqgan.decode_quantized(z_q))
    assert decoded.shape == image.shape

    path = save_tiny_diffusion(tmp_path / "diffusion.ckpt", model)
    loaded, meta = load_diffusion(path)
    assert meta["stage1_kind"] == kind == loaded.vqgan.kind
    torch.testing.assert_close(loaded.decode(latent, label), decoded)


def test_a_stage2_checkpoint_whose_stage1_kind_disagrees_is_a_user_error(tmp_path):
    model = diffusion_over("ema_vq")
    model.scale_factor.fill_(1.0)
    path = save_tiny_diffusion(tmp_path / "diffusion.ckpt", model)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["diffusion"]["stage1_kind"] = "fsq"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="trained on a 'fsq' stage-1 latent.*of kind 'ema_vq'") as err:
        load_diffusion(path)
    assert "\n" not in str(err.value)
