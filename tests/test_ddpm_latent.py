"""LatentDiffusion: frozen stage 1, scale factor, loss with condition dropout, EMA, guidance, checkpoints."""
from __future__ import annotations

import pytest
import torch

from ddpm.checkpoint import load_diffusion
from ddpm.latent_diffusion import make_denoiser
from ddpm.samplers import SamplerSettings
from ddpm_tiny import save_tiny_diffusion, save_tiny_vqgan, tiny_diffusion
from utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n: int = 2, shape=(8, 8, 4), label_nc: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *shape, generator=gen) * 2 - 1, torch.randint(0, label_nc, (n, 1, *shape), generator=gen)


def test_stage1_stays_frozen_and_in_eval_mode():
    model = tiny_diffusion()
    model.train()
    assert model.unet.training and not model.vqgan.training and not model.ema_unet.training
    assert not any(p.requires_grad for p in model.vqgan.parameters())
    image, label = batch()
    model.training_loss(image, label).backward()
    assert all(p.grad is None for p in model.vqgan.parameters())
    assert all(p.grad is None for p in model.ema_unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())


def test_scale_factor_is_computed_stored_and_used(tmp_path):
    model = tiny_diffusion(scale_factor=None)
    assert not model.has_scale_factor
    image, label = batch()
    with pytest.raises(RuntimeError, match="scale factor"):
        model.encode(image)
    z = model.encode_unscaled(image)
    scale = model.set_scale_factor_from(float(z.mean()), float(z.square().mean()))
    assert scale == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-5)
    scaled = model.encode(image)
    assert float(scaled.std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(model.decode(scaled, label), model.vqgan.decode(z, None))
    # stored in the checkpoint and restored without anyone passing it
    path = save_tiny_diffusion(tmp_path / "diff.ckpt", model)
    loaded, meta = load_diffusion(path)
    assert float(loaded.scale_factor) == pytest.approx(scale)
    torch.testing.assert_close(loaded.encode(image), scaled)
    assert meta["model"]["label_nc"] == 3 and meta["vqgan"]["embedding_dim"] == 4


def test_condition_dropout_happens_at_its_rate(monkeypatch):
    model = tiny_diffusion(label_nc=3)
    model.cond_drop_prob = 0.25
    seen = []
    original = model.unet.condition

    def spy(label, **kwargs):
        seen.append((label.flatten(1) == 3).all(1))
        return original(label, **kwargs)

    monkeypatch.setattr(model.unet, "condition", spy)
    image, label = batch(n=400, shape=(4, 4, 4))
    model.training_loss(image, label, generator=torch.Generator().manual_seed(0))
    null = torch.cat(seen)
    assert null.numel() == 400
    assert float(null.float().mean()) == pytest.approx(0.25, abs=0.06)


def test_loss_kinds_differ_and_go_down():
    image, label = batch(n=4)
    model = tiny_diffusion()
    model.loss_kind = "l1"
    l1 = model.training_loss(image, label, generator=torch.Generator().manual_seed(0))
    model.loss_kind = "l2"
    l2 = model.training_loss(image, label, generator=torch.Generator().manual_seed(0))
    assert float(l1) != pytest.approx(float(l2))
    model.train()
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):  # the same timesteps and noise every step: a fixed objective
        loss = model.training_loss(image, label, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


def test_ema_update():
    model = tiny_diffusion()
    before = [p.clone() for p in model.ema_unet.parameters()]
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(1.0)
    model.update_ema(step=10**6)  # ramp finished: decay = ema_decay = 0.9
    for old, new, live in zip(before, model.ema_unet.parameters(), model.unet.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * live)
    model.update_ema(step=0)  # ramp start: decay (1 + 0) / (10 + 0) = 0.1
    for new, live in zip(model.ema_unet.parameters(), model.unet.parameters()):
        assert float((new - live).abs().max()) < 0.9 * 1.5


@pytest.mark.parametrize("decoder", ["spade", "normal"])
def test_guidance_mixes_conditional_and_null_predictions(decoder):
    model = tiny_diffusion(decoder=decoder)
    _, label = batch()
    x = torch.randn(2, 4, 4, 4, 2)
    net = model.ema_unet
    t = torch.full((2,), 20)
    with torch.no_grad():
        cond = net(x, t, net.condition(label))
        uncond = net(x, t, net.null_condition(label))
        guided = make_denoiser(net, label, 3.0)(x, 20)
        plain = make_denoiser(net, label, 1.0)(x, 20)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, cond, rtol=1e-5, atol=1e-6)
    assert (cond - uncond).abs().mean() > 1e-4


def test_sampling_is_seeded_and_follows_the_label():
    model = tiny_diffusion()
    _, label = batch(n=1)
    settings = SamplerSettings("dpmpp_2m", 4)
    a = model.synthesize(label, settings=settings, generator=torch.Generator().manual_seed(0))
    b = model.synthesize(label, settings=settings, generator=torch.Generator().manual_seed(0))
    c = model.synthesize(label, settings=settings, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 1, 8, 8, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    latent = model.sample_latent(label, settings=settings, generator=torch.Generator().manual_seed(0))
    other = model.sample_latent((label + 1) % 3, settings=settings, generator=torch.Generator().manual_seed(0))
    assert (latent - other).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="divisible"):
        model.sample_latent(torch.zeros(1, 1, 6, 8, 4, dtype=torch.long), settings=settings)
    with pytest.raises(ValueError, match="label values"):
        model.sample_latent(torch.full((1, 1, 8, 8, 4), 3), settings=settings)


def test_spade_stage1_needs_matching_classes():
    with pytest.raises(ValueError, match="classes"):
        tiny_diffusion(label_nc=3, vqgan_label_nc=4)
    model = tiny_diffusion(label_nc=3, vqgan_label_nc=3)
    _, label = batch(n=1)
    out = model.synthesize(label, settings=SamplerSettings("ddim", 2))
    assert out.shape == (1, 1, 8, 8, 4)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_diffusion(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_diffusion(garbage)
    stage1 = save_tiny_vqgan(tmp_path / "vqgan.ckpt")
    with pytest.raises(UserError, match="stage-1"):
        load_diffusion(stage1)
    model = tiny_diffusion()
    path = save_tiny_diffusion(tmp_path / "diff.ckpt", model)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"].pop("model.unet.conv_in.weight")
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(UserError, match="do not match"):
        load_diffusion(tmp_path / "broken.ckpt")
    del checkpoint["diffusion"]
    torch.save(checkpoint, tmp_path / "nometa.ckpt")
    with pytest.raises(UserError, match="malformed"):
        load_diffusion(tmp_path / "nometa.ckpt")
    unfitted = save_tiny_diffusion(tmp_path / "unfitted.ckpt", tiny_diffusion(scale_factor=None))
    with pytest.raises(UserError, match="scale factor"):
        load_diffusion(unfitted)
