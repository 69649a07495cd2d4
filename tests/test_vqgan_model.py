"""Stage-1 networks (shapes, anisotropic factors, SPADE) and the checkpoint loader."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layers.norm import SPADE
from layers.strides import per_level_strides
from utils.errors import UserError
from vq_gan_3d.checkpoint import load_vqgan, save_vqgan
from vq_gan_3d.model import VQGAN

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(base_channels=4, norm_groups=2, num_codes=16, embedding_dim=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_once(model: VQGAN, image: torch.Tensor, label: torch.Tensor | None = None) -> VQGAN:
    model.train()(image, label)  # initialises the codebook
    return model.eval()


@pytest.mark.parametrize("downsample, channel_mult, crop", [
    ((4, 4, 4), (1, 2, 2), (16, 16, 8)),
    ((4, 4, 2), (1, 2, 2), (16, 16, 8)),
    ((2, 2, 1), (1, 2), (8, 12, 6)),
    ((8, 8, 4), (1, 1, 2, 2), (16, 16, 8)),
])
@pytest.mark.parametrize("decoder", ["normal", "spade", "spade_compressed"])
def test_shapes(downsample, channel_mult, crop, decoder):
    spade = dict(label_nc=3, mask_compressor_channels=2 if decoder == "spade_compressed" else 0)
    model = VQGAN(channel_mult=channel_mult, downsample=downsample, **TINY, **(spade if decoder != "normal" else {}))
    image = torch.rand(2, 1, *crop) * 2 - 1
    label = torch.randint(0, 3, (2, 1, *crop)) if decoder != "normal" else None
    z = model.encode(image)
    assert tuple(z.shape) == (2, *model.latent_shape(crop))
    assert tuple(z.shape[2:]) == tuple(c // f for c, f in zip(crop, downsample))
    z_q, info = model.quantize(z)
    assert z_q.shape == z.shape and tuple(info["indices"].shape) == (2, *z.shape[2:])
    assert model.decode(z, label).shape == image.shape
    recon, _ = model(image, label)
    assert recon.shape == image.shape


def test_per_axis_strides():
    assert per_level_strides((4, 4, 2)) == [(2, 2, 2), (2, 2, 1)]
    assert per_level_strides((2, 1, 4)) == [(2, 1, 2), (1, 1, 2)]
    with pytest.raises(ValueError, match="powers of two"):
        per_level_strides((3, 4, 4))


def test_inconsistent_settings_are_refused():
    with pytest.raises(ValueError, match="channel_mult needs 3 entries"):
        VQGAN(channel_mult=(1, 2), downsample=(4, 4, 4), **TINY)
    model = VQGAN(channel_mult=(1, 2), downsample=(2, 2, 2), label_nc=3, **TINY)
    with pytest.raises(ValueError, match="needs the label map"):
        model.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        model.latent_shape((9, 8, 8))


def test_spade_resizes_the_label_and_follows_it():
    torch.manual_seed(0)
    spade = SPADE(norm_channels=8, label_channels=3, hidden_channels=4, spatial_dims=3, norm_groups=4)
    x = torch.randn(1, 8, 4, 4, 2)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 3, (1, 16, 16, 8)), 3).movedim(-1, 1).float()
    out = spade(x, onehot)  # label at 4x the feature size
    assert out.shape == x.shape
    assert not torch.allclose(out, spade(x, torch.roll(onehot, 1, dims=1)))
    spade_2d = SPADE(norm_channels=4, label_channels=2, spatial_dims=2, norm_groups=2)
    assert spade_2d(torch.randn(2, 4, 6, 6), torch.rand(2, 2, 12, 12)).shape == (2, 4, 6, 6)


@pytest.mark.parametrize("kernel", [3, 1])
def test_spade_decoder_reconstruction_changes_with_the_label(kernel):
    torch.manual_seed(0)
    model = VQGAN(channel_mult=(1, 2), downsample=(2, 2, 2), label_nc=3, mask_compressor_channels=2,
                  spade_kernel_size=kernel, **TINY)
    spade_kernels = {m.kernel_size for name, m in model.decoder.named_modules()
                     if isinstance(m, torch.nn.Conv3d) and ("shared" in name or "to_gamma" in name)}
    assert spade_kernels == {(kernel,) * 3}  # every SPADE convolution of the decoder
    image = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., 2:6, 2:6, 2:6] = 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):  # a few training steps, so this is not only random initial weights
        recon, info = model.train()(image, label)
        opt.zero_grad()
        ((recon - image).abs().mean() + info["commitment_loss"]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        z = model.encode(image)
        same = model.decode(z, label)
        edited = label.clone()
        edited[..., 2:6, 2:6, 2:6] = 2  # relabel the "lesion"
        changed = model.decode(z, edited)
        assert torch.equal(same, model.decode(z, label))  # deterministic in eval
        inside = (changed - same)[..., 2:6, 2:6, 2:6].abs().mean()
        assert inside > 1e-3


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(channel_mult=(1, 2), downsample=(2, 2, 1), label_nc=3, **TINY)
    image, label = torch.rand(1, 1, 8, 8, 4) * 2 - 1, torch.randint(0, 3, (1, 1, 8, 8, 4))
    trained_once(model, image, label)
    path = save_vqgan(model, tmp_path / "stage1.ckpt", dataset={"spacing": [1.0, 1.0, 2.0]})
    loaded = load_vqgan(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.hparams == model.hparams
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, label)[0], model(image, label)[0])
        torch.testing.assert_close(loaded.decode(loaded.encode(image), label), model.decode(model.encode(image), label))


def test_wrong_checkpoints_give_one_line_errors(tmp_path):
    model = trained_once(VQGAN(channel_mult=(1, 2), downsample=(2, 2, 2), **TINY), torch.rand(1, 1, 8, 8, 8))
    good = save_vqgan(model, tmp_path / "good.ckpt")
    checkpoint = torch.load(good, weights_only=True)

    with pytest.raises(UserError, match="no such checkpoint file"):
        load_vqgan(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_vqgan(garbage)
    stage2 = tmp_path / "diffusion.ckpt"
    torch.save({**checkpoint, "stage": "diffusion"}, stage2)
    with pytest.raises(UserError, match="stage-2 \\(diffusion\\) checkpoint"):
        load_vqgan(stage2)
    anonymous = tmp_path / "anonymous.ckpt"
    torch.save({"state_dict": checkpoint["state_dict"]}, anonymous)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_vqgan(anonymous)
    malformed = tmp_path / "malformed.ckpt"
    torch.save({"stage": "vqgan", "state_dict": checkpoint["state_dict"]}, malformed)
    with pytest.raises(UserError, match="malformed"):
        load_vqgan(malformed)
    wider = tmp_path / "wider.ckpt"
    torch.save({**checkpoint, "vqgan": {**checkpoint["vqgan"],
                                        "hparams": {**model.hparams, "base_channels": 8}}}, wider)
    with pytest.raises(UserError, match="do not match the stored VQ-GAN settings") as err:
        load_vqgan(wider)
    assert "\n" not in str(err.value)

    # The CLI turns it into one line on stderr and exit status 2.
    result = subprocess.run([sys.executable, "-m", "vq_gan_3d.reconstruct", f"ckpt={stage2}",
                             f"images={tmp_path}", f"out={tmp_path / 'out'}"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "diffusion" in result.stderr
