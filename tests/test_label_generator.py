"""The label-map generator: attribute vectors, a tiny generator overfit on two phantom maps (class volumes
reproduced, lesion volume following the requested one), checkpoints, and a short two-phase training run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataset import cache
from dataset.attributes import LesionAttributes
from dataset.attributes import measure
from dataset.crops import LABEL_PAD_VALUE, pad_to_at_least
from ddpm.label_checkpoint import load_label_generator, save_label_generator
from ddpm.label_generator import (AttributeUNet, attribute_vector, foreground_box, grid_affine, lesion_positions,
                                  soft_dice_loss, spatial_channels)
from ddpm.samplers import SamplerSettings
from ddpm_tiny import save_tiny_vqgan, tiny_vqgan
from labels_tiny import LABEL_NC, LESIONS, SHAPE, SPACING, phantom_map, tiny_generator, vectors_of
from train.common import run_training
from train.lit_labels import LitLabels, autoencoder_crop, random_crops
from train.train_labels import build_datamodule
from utils.checkpoint import dataset_settings
from utils.errors import UserError
from vq_gan_3d.checkpoint import save_vqgan

pytestmark = pytest.mark.usefixtures("one_thread")

AFFINE = grid_affine(SHAPE, SPACING)
SMALL, LARGE = 2.0, 3.5  # lesion radii (voxels) of the two training maps: 33 and 179 lesion voxels
SAMPLER = SamplerSettings("ddim", 20, 0.0)


def test_attribute_vector_and_standardisation_by_hand():
    present = {"class_2": LesionAttributes(volume_ml=3.0, count=2, centroid=(0.25, 0.5, 1.0))}
    absent = {"class_2": LesionAttributes(volume_ml=0.0, count=0, centroid=None)}
    np.testing.assert_allclose(attribute_vector(present, ["class_2"]), [math.log1p(3.0), 2, 0.25, 0.5, 1.0])
    assert np.isnan(attribute_vector(absent, ["class_2"])[2:]).all()
    model = tiny_generator()
    model.fit_attributes(np.stack([attribute_vector(present, ["class_2"]), attribute_vector(absent, ["class_2"])]))
    # mean/std over both cases for volume and count; the centroid only from the case that has one (std 0 -> 1)
    np.testing.assert_allclose(model.attribute_mean.numpy(), [math.log1p(3.0) / 2, 1.0, 0.25, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(model.attribute_std.numpy(), [math.log1p(3.0) / 2, 1.0, 1.0, 1.0, 1.0], rtol=1e-6)
    standard = model.standardise(attribute_vector(absent, ["class_2"])[None]).numpy()
    np.testing.assert_allclose(standard, [[-1.0, -1.0, 0.0, 0.0, 0.0]], atol=1e-6)  # absent centroid = the mean


def test_soft_dice_loss_known_values():
    onehot = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 2]]), 3).movedim(-1, 1).float()[..., None, None]
    perfect = soft_dice_loss(onehot * 40.0, onehot)
    assert float(perfect) == pytest.approx(0.0, abs=1e-6)
    uniform = soft_dice_loss(torch.zeros_like(onehot), onehot, eps=0.0)  # p = 1/3 everywhere
    # class c with n_c voxels: 2 * n_c/3 / (4/3 + n_c); n = 1, 2, 1
    expected = 1 - np.mean([2 * (1 / 3) / (4 / 3 + 1), 2 * (2 / 3) / (4 / 3 + 2), 2 * (1 / 3) / (4 / 3 + 1)])
    assert float(uniform) == pytest.approx(expected, rel=1e-6)


def test_attribute_unet_depends_on_the_vector_and_the_null_vector():
    torch.manual_seed(0)
    net = AttributeUNet(in_channels=4, n_attributes=5, unet=dict(base_channels=8, channel_mult=[1, 2],
                        attention_levels=[], norm_groups=4, group_width=8, head_channels=8))
    with torch.no_grad():
        for p in net.parameters():  # the UNet's output layer starts at zero
            if not p.any():
                p.normal_(0, 0.1)
    x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([3, 3])
    a = torch.randn(1, 5).expand(2, 5)
    same = net(x[:1].expand(2, -1, -1, -1, -1), t, a)
    torch.testing.assert_close(same[0], same[1])
    other = net(x[:1].expand(2, -1, -1, -1, -1), t, torch.stack([a[0], a[0] + 1]))
    assert (other[0] - other[1]).abs().max() > 1e-4
    dropped = net(x, t, torch.randn(2, 5), drop=torch.tensor([True, True]))
    null = net(x, t, net.null_vector.detach().expand(2, 5))
    torch.testing.assert_close(dropped, null)
    assert not net.unet.time_mlp._forward_hooks  # the hook lives for one call only


def test_lesion_positions_by_hand():
    box = np.array([[[0.0, 0.0, 0.0], [16.0, 16.0, 12.0]]])
    radius = 8.0  # voxels of 0.027 mL (3 mm): sigma 8 / 4 = 2 latent voxels
    volume = 4 / 3 * math.pi * radius**3 * 0.027
    present = {"class_2": LesionAttributes(volume_ml=volume, count=1, centroid=(0.5, 0.25, 1.0))}
    small = {"class_2": LesionAttributes(volume_ml=0.027, count=1, centroid=(0.0, 0.0, 0.0))}
    absent = {"class_2": LesionAttributes(volume_ml=0.0, count=0, centroid=None)}
    found = lesion_positions([present, small, absent], ["class_2"], np.repeat(box, 3, 0), 0.027, (4, 4, 4))
    # image index (8, 4, 12); latent voxel j covers image voxels 4j..4j+3, centre 4j + 1.5
    np.testing.assert_allclose(found[0, 0], [(8 - 1.5) / 4, (4 - 1.5) / 4, (12 - 1.5) / 4, 2.0])
    np.testing.assert_allclose(found[1, 0], [-1.5 / 4, -1.5 / 4, -1.5 / 4, 1.0])  # sigma at least 1
    assert np.isnan(found[2]).all()


def test_spatial_channels_are_gaussians_at_the_positions():
    positions = torch.tensor([[[2.0, 1.0, 3.0, 1.5]], [[math.nan] * 4]])
    blobs = spatial_channels(positions, (4, 4, 5), torch.zeros(()))
    assert blobs.shape == (2, 1, 4, 4, 5) and float(blobs[1].abs().max()) == 0.0  # absent: zero
    assert float(blobs[0, 0, 2, 1, 3]) == pytest.approx(1.0) and int(blobs[0, 0].argmax()) == (2 * 4 + 1) * 5 + 3
    assert float(blobs[0, 0, 3, 1, 3]) == pytest.approx(math.exp(-1 / (2 * 1.5**2)), rel=1e-6)
    assert float(blobs[0, 0, 0, 0, 0]) == pytest.approx(math.exp(-(4 + 1 + 9) / (2 * 1.5**2)), rel=1e-6)


def test_a_training_maps_own_position_is_its_lesion_centre():
    label = phantom_map(LARGE)  # lesion centred at voxel (9, 8, 6)
    found = measure(label, AFFINE, LESIONS)
    box = foreground_box(label)
    position = lesion_positions([found], list(LESIONS), box[None], float(np.prod(SPACING)) / 1000, (4, 4, 4))[0, 0]
    np.testing.assert_allclose(position[:3], (np.array([9.0, 8.0, 6.0]) - 1.5) / 4, atol=1e-6)
    assert np.isnan(foreground_box(np.zeros((3, 3, 3), int))).all()
    block = np.zeros((6, 6, 6), int)
    block[1:4, 2, 3:5] = 2
    np.testing.assert_array_equal(foreground_box(block), [[1, 2, 3], [3, 2, 4]])


def test_attribute_unet_follows_the_spatial_channel_unless_dropped():
    torch.manual_seed(0)
    net = AttributeUNet(in_channels=4, n_attributes=5, n_spatial=1, unet=dict(
        base_channels=8, channel_mult=[1, 2], attention_levels=[], norm_groups=4, group_width=8, head_channels=8))
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    x, t, a = torch.randn(1, 4, 4, 4, 4).expand(2, -1, -1, -1, -1), torch.tensor([3, 3]), torch.zeros(2, 5)
    positions = torch.tensor([[[0.0, 0.0, 0.0, 1.0]], [[3.0, 3.0, 3.0, 1.0]]])
    moved = net(x, t, a, positions=positions)
    assert (moved[0] - moved[1]).abs().max() > 1e-4
    dropped = net(x, t, a, drop=torch.tensor([True, True]), positions=positions)
    torch.testing.assert_close(dropped[0], dropped[1])
    with pytest.raises(ValueError, match="positions"):
        net(x, t, a)


def test_class_offsets_restore_the_volumes_an_argmax_shifted():
    """Logits that favour class 2 over class 1 by a constant 0.6 (noise elsewhere symmetric): the fitted offsets
    undo that shift (known by construction), restore every class's volume and so the labels' agreement."""
    generator = torch.Generator().manual_seed(0)
    truth = [torch.randint(0, LABEL_NC, (4000,), generator=generator) for _ in range(3)]
    shift = torch.tensor([0.0, -0.3, 0.3])[:, None]
    logits = [torch.nn.functional.one_hot(y, LABEL_NC).T.float() + shift
              + 0.8 * torch.randn(LABEL_NC, y.numel(), generator=generator) for y in truth]
    model = tiny_generator()
    plain = [model.classify(x[None])[0] for x in logits]  # not fitted yet: the plain argmax
    assert sum(int((p == 1).sum()) for p in plain) < 0.8 * sum(int((y == 1).sum()) for y in truth)
    errors = model.fit_class_bias(zip(logits, truth))
    bias = model.class_bias
    assert float(bias[0]) == 0.0 and float(bias[1] - bias[2]) == pytest.approx(0.6, abs=0.1)
    assert np.abs(errors).max() < 0.01  # relative volume error per class
    fitted = [model.classify(x[None])[0] for x in logits]
    agree = lambda made: float(torch.cat([m == y for m, y in zip(made, truth)]).float().mean())  # noqa: E731
    assert agree(fitted) > agree(plain) + 0.02
    sampled = tiny_generator()  # a random half of each map's open voxels, each counted twice: about the same
    sampled.fit_class_bias(zip(logits, truth), max_per_map=2000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sampled.class_bias, bias, atol=0.05, rtol=0)
    off = tiny_generator(calibrate_classes=False)
    off.fit_class_bias(zip(logits, truth))
    assert torch.equal(off.class_bias, torch.zeros(LABEL_NC))


@pytest.fixture(scope="module")
def overfit():
    """A tiny generator trained on two phantom maps that differ only in lesion size."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    maps = [phantom_map(SMALL), phantom_map(LARGE)]
    vectors, found = vectors_of(maps, AFFINE)
    model = tiny_generator()
    labels = torch.from_numpy(np.stack(maps))[:, None]
    optimiser = torch.optim.Adam(model.autoencoder.parameters(), 3e-3)
    losses = []
    for _ in range(150):
        loss, _ = model.autoencoder_loss(labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    model.fit_attributes(vectors)
    latent = model.encode_unscaled(labels)
    model.scale_factor.fill_(1.0 / float(latent.std()))
    with torch.no_grad():
        model.fit_class_bias(zip(model.autoencoder.decode(latent), labels[:, 0]))
    attributes = model.standardise(vectors)
    optimiser = torch.optim.Adam(model.unet.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(300):
        loss = model.diffusion_loss(latent * model.scale_factor, attributes, generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        model.update_ema(step)
    torch.set_num_threads(previous)
    return model.eval(), maps, vectors, found, losses


def generate(model, vectors, repeats=2, guidance=2.0, seed=1):
    attributes = model.standardise(np.repeat(vectors, repeats, axis=0))
    return model.sample(attributes, SHAPE, settings=SAMPLER, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(seed)).numpy()


def test_overfit_generator_reproduces_the_class_volumes(overfit):
    model, maps, vectors, _, losses = overfit
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])  # the autoencoder learned the maps
    generated = generate(model, vectors)  # rows: small, small, large, large
    assert generated.shape == (4, *SHAPE) and generated.dtype == np.int64
    assert generated.min() >= 0 and generated.max() < LABEL_NC
    for sample, target in zip(generated, [maps[0], maps[0], maps[1], maps[1]]):
        counts, wanted = np.bincount(sample.ravel(), minlength=LABEL_NC), np.bincount(target.ravel(), minlength=3)
        # stated tolerance: body (class 1) within 10 % of its voxels, lesion within 30 voxels (the two training
        # lesions differ by 146 voxels)
        assert abs(int(counts[1]) - int(wanted[1])) <= 0.1 * wanted[1], (counts, wanted)
        assert abs(int(counts[2]) - int(wanted[2])) <= 30, (counts, wanted)


def test_requested_lesion_volume_orders_the_generated_lesion_volume(overfit):
    model, _, vectors, found, _ = overfit
    assert found[0]["class_2"].volume_ml < found[1]["class_2"].volume_ml
    for seed in (1, 2):
        generated = generate(model, vectors, repeats=1, seed=seed)
        small, large = (int((g == LESIONS["class_2"]).sum()) for g in generated)
        assert small < large, (seed, small, large)


def test_checkpoint_round_trip(tmp_path, overfit):
    model, _, _, found, _ = overfit
    path = save_label_generator(model, tmp_path / "labels.ckpt", dataset={"name": "tiny", "spacing": list(SPACING)},
                                lesion_classes=LESIONS, attribute_table=found, volume_shape=SHAPE, split=None)
    loaded, meta = load_label_generator(path)  # weights_only=True inside
    assert meta["volume_shape"] == list(SHAPE) and meta["lesion_classes"] == LESIONS
    assert meta["attribute_table"] == found
    vectors = np.stack([attribute_vector(f, list(LESIONS)) for f in found])
    np.testing.assert_array_equal(generate(loaded, vectors, repeats=1), generate(model, vectors, repeats=1))
    with pytest.raises(UserError, match="stage-1"):
        load_label_generator(save_tiny_vqgan(tmp_path / "vqgan.ckpt"))
    unfitted = save_label_generator(tiny_generator(), tmp_path / "early.ckpt", dataset={}, lesion_classes=LESIONS,
                                    attribute_table=[], volume_shape=SHAPE, split=None)
    with pytest.raises(UserError, match="autoencoder phase"):
        load_label_generator(unfitted)


TINY_OVERRIDES = [
    "model.generator.autoencoder.base_channels=4", "model.generator.autoencoder.channel_mult=[1,2]",
    "model.generator.autoencoder.num_res_blocks=1", "model.generator.autoencoder.downsample=[2,2,2]",
    "model.generator.autoencoder.embedding_dim=2", "model.generator.autoencoder.norm_groups=4",
    "model.generator.unet.base_channels=8", "model.generator.unet.channel_mult=[1,2]",
    "model.generator.unet.attention_levels=[1]", "model.generator.unet.head_channels=8",
    "model.generator.unet.group_width=8", "model.generator.unet.norm_groups=4", "model.generator.timesteps=20",
    "model.autoencoder_steps=2", "model.validation.steps=2", "model.validation.n_volumes=1",
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_runs_both_phases_on_the_stored_split(compose_cfg, phantom_root, tmp_path, precision):
    dataset = ["dataset=nifti", f"dataset.root_dir={phantom_root}", "dataset.label_nc=3", "dataset.modality=mr",
               "dataset/intensity=percentile", "dataset.spacing=[1.0,1.0,2.0]", "dataset.num_workers=0",
               "dataset.name=phantom", "dataset.lesion_classes=[class_2]", "dataset.batch_size=2"]
    stored = {"train": ["case001", "case002", "case004", "case005"], "val": ["case000"], "test": ["case003"]}
    cfg_check = compose_cfg("check", dataset)
    stage1 = save_vqgan(tiny_vqgan(), tmp_path / "vqgan.ckpt", dataset=dataset_settings(cfg_check.dataset),
                        split=stored)
    run_dir = tmp_path / "run"
    cfg = compose_cfg("labels", [*dataset, *TINY_OVERRIDES, "trainer=cpu", "logger=csv",
                                 f"trainer.precision={precision}", f"model.split_ckpt={stage1}",
                                 f"train.run_dir={run_dir}"])
    module = LitLabels(cfg)
    datamodule = build_datamodule(cfg, module)
    run_training(cfg, module, datamodule)
    # the frozen encodings the diffusion learns are float32 under any training precision, as sampling decodes them
    for case in datamodule.train_cases:
        padded = pad_to_at_least(np.asarray(cache.load_preprocessed(case, datamodule.cfg).label), [24, 24, 16],
                                 LABEL_PAD_VALUE)[0].astype(np.int16)
        with torch.no_grad():
            expected = module.model.encode_unscaled(torch.from_numpy(padded)[None, None])[0]
        assert torch.equal(module._latents[case.case_id], expected), case.case_id
    model, meta = load_label_generator(run_dir / "last.ckpt")
    assert meta["split"] == stored  # the stage-1 split, not a fresh one
    assert meta["volume_shape"] == [24, 24, 16]  # the phantoms' shape, already a multiple of 4
    assert len(meta["attribute_table"]) == len(stored["train"])
    drawn = meta["attribute_table"][0]  # the config's generator has the spatial condition
    assert model.n_spatial == 1 and float(model.voxel_ml) == pytest.approx(0.002)
    box = model.body_box.numpy()  # mean body box of the training maps, inside the 24x24x16 grid
    assert (box[0] >= 0).all() and (box[1] <= [23, 23, 15]).all() and (box[1] > box[0]).all()
    sample = model.sample(model.standardise(attribute_vector(drawn, ["class_2"])[None]), meta["volume_shape"],
                          positions=model.positions([drawn], ["class_2"]), settings=SamplerSettings("ddim", 2, 0.0))
    assert sample.shape == (1, 24, 24, 16) and 0 <= int(sample.min()) and int(sample.max()) < 3


def test_autoencoder_crops_are_blocks_of_each_map():
    torch.manual_seed(0)
    label = torch.arange(2 * 12 * 8 * 8).view(2, 1, 12, 8, 8)
    crops = random_crops(label, [4, 8, 4])
    assert crops.shape == (2, 1, 4, 8, 4)
    for i in range(2):  # each crop is the contiguous block of its own map at some offset
        first = int(crops[i, 0, 0, 0, 0]) - i * 12 * 8 * 8
        x, y, z = first // 64, (first // 8) % 8, first % 8
        assert y == 0 and torch.equal(crops[i], label[i, :, x:x + 4, :, z:z + 4])
    starts = {int(random_crops(label, [4, 8, 4])[0, 0, 0, 0, 0]) // 64 for _ in range(50)}
    assert starts == set(range(9))  # every start along x drawn (12 - 4 + 1 positions)
    assert autoencoder_crop(None, [4, 4, 4]) is None and autoencoder_crop([8, 8, 4], [4, 4, 4]) == [8, 8, 4]
    with pytest.raises(UserError, match=r"model.autoencoder_crop=\[8, 6, 4\].*divisible by \[4, 4, 4\]"):
        autoencoder_crop([8, 6, 4], [4, 4, 4])
