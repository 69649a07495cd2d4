"""The stage-2 latent cache: latent crops on the stage-1 grid that match image-space crops, labels cropped to
match, a stale cache (other weights) never reused, the on-the-fly path kept under image-space augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dataset.crops import IMAGE_PAD_VALUE, crop
from dataset.datamodule import CropCentres, CropDataset, VolumeDataModule
from ddpm.latent_cache import (LatentCache, LatentCropDataset, attach_latent_cache, augmentation_active,
                               padded_crop, volume_pads)
from ddpm_tiny import tiny_vqgan

pytestmark = pytest.mark.usefixtures("one_thread")


class LocalEncoder(nn.Module):
    """A purely local x2 encoder (kernel 2, stride 2): each latent voxel sees its own 2x2x2 block, so tiled
    encoding is exact and a crop of the cached latent equals the encoding of the image crop everywhere."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(1, 3, 2, stride=2)
        self.downsample = (2, 2, 2)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


def test_padded_crop_equals_crop_of_padded_volume():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(7, 9, 5)).astype(np.float32)
    pads = [[2, 3], [0, 1], [4, 4]]
    padded = np.pad(array, pads, constant_values=-1.0)
    for _ in range(50):
        size = [int(rng.integers(1, n + 1)) for n in padded.shape]
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(padded.shape, size)]
        np.testing.assert_array_equal(padded_crop(array, pads, start, size, -1.0), crop(padded, start, size))


@pytest.mark.parametrize("shape, crop_size, factor", [((24, 24, 16), (16, 16, 8), (2, 2, 2)),
                                                      ((13, 30, 5), (16, 16, 8), (4, 4, 2))])
def test_volume_pads_give_at_least_a_crop_on_the_grid(shape, crop_size, factor):
    pads = volume_pads(shape, crop_size, factor)
    padded = [n + a + b for n, (a, b) in zip(shape, pads)]
    assert all(p >= s and p % f == 0 for p, s, f in zip(padded, crop_size, factor))
    short = [max(0, s - n) for n, s in zip(shape, crop_size)]
    assert [a for a, _ in pads] == [s // 2 for s in short]  # symmetric, as the image-space crops pad


def prepared_entries(phantom_cfg, tmp_path):
    datamodule = VolumeDataModule(phantom_cfg, tmp_path / "run")
    datamodule.setup()
    return datamodule, list(datamodule.train_set.entries)


def test_latent_crop_matches_encoding_of_the_image_crop(phantom_cfg, tmp_path):
    """Grid alignment, exactly: with a local encoder, the cached latent crop equals the encoding of the image
    crop at `latent origin x factor`, and the label crop is the label at that origin."""
    from dataset import cache

    datamodule, entries = prepared_entries(phantom_cfg, tmp_path)
    encoder = LocalEncoder()
    latent_cache = LatentCache(phantom_cfg, encoder, crop_size=phantom_cfg.crop_size, factor=encoder.downsample)
    assert latent_cache.build(entries, encoder.encode, "cpu") == len(entries)
    dataset = LatentCropDataset(latent_cache, entries, centres=CropCentres(foreground_prob=0.5))
    crop_size = list(phantom_cfg.crop_size)
    for index in range(len(entries)):
        torch.manual_seed(index)
        item = dataset[index]
        case = cache.read_entry(entries[index])
        latent, pads = latent_cache.read(entries[index])
        padded_image = np.pad(np.asarray(case.image), pads, constant_values=IMAGE_PAD_VALUE)
        padded_label = np.pad(np.asarray(case.label), pads, constant_values=0)
        # find the crop's origin: the latent crop is a window of the cached latent
        size = [s // 2 for s in crop_size]
        origins = [o for o in np.ndindex(*[n - s + 1 for n, s in zip(latent.shape[1:], size)])
                   if np.array_equal(latent[(slice(None), *(slice(a, a + s) for a, s in zip(o, size)))],
                                     item["latent"].numpy())]
        assert len(origins) >= 1
        origin = [2 * o for o in origins[0]]
        image_crop = torch.from_numpy(np.ascontiguousarray(crop(padded_image, origin, crop_size)))[None, None]
        with torch.no_grad():
            direct = encoder.encode(image_crop)[0]
        torch.testing.assert_close(item["latent"], direct, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(item["label"][0].numpy(), crop(padded_label, origin, crop_size))
        assert item["latent"].shape == (3, *size) and item["label"].dtype == torch.int64


def test_vqgan_latent_crop_close_to_crop_encoding(phantom_cfg):
    """With the real encoder (3x3x3 convolutions, GroupNorm over its input) a crop of the cached latent (tiles of
    the training crop, blended as at sampling time) differs from the encoding of the image crop through the
    receptive field at the crop's borders and the norm statistics. Stated bound, on a smooth random 64^3 volume
    with 48^3 crops, 4 latent voxels from the crop's borders: mean absolute difference under 10 % of the latent's
    standard deviation at every tested origin."""
    from layers.tiling import encode_tiled

    vqgan = tiny_vqgan()
    latent_cache = LatentCache(phantom_cfg, vqgan, crop_size=[48, 48, 48], factor=vqgan.downsample)
    assert latent_cache.tile == [24, 24, 24]
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 64, 64, 64, generator=generator), 5, 1, 2) * 3
    with torch.no_grad():
        latent = encode_tiled(vqgan.encode, image, factor=vqgan.downsample, tile=latent_cache.tile, overlap=0.25)
        spread = float(latent.std())
        for origin in (0, 4, 8):  # latent voxels
            direct = vqgan.encode(image[..., 2 * origin:2 * origin + 48, 2 * origin:2 * origin + 48,
                                        2 * origin:2 * origin + 48])
            cached = latent[..., origin:origin + 24, origin:origin + 24, origin:origin + 24]
            inner = (..., slice(4, -4), slice(4, -4), slice(4, -4))
            error = float((cached[inner] - direct[inner]).abs().mean())
            assert error <= 0.10 * spread, (origin, error, spread)


def test_stale_cache_is_rebuilt_never_reused(phantom_cfg, tmp_path):
    _, entries = prepared_entries(phantom_cfg, tmp_path)
    first, other = LocalEncoder(seed=10), LocalEncoder(seed=11)  # weights no other test caches
    cache_a = LatentCache(phantom_cfg, first, crop_size=phantom_cfg.crop_size, factor=(2, 2, 2))
    assert cache_a.build(entries, first.encode, "cpu") == len(entries)
    again = LatentCache(phantom_cfg, LocalEncoder(seed=10), crop_size=phantom_cfg.crop_size, factor=(2, 2, 2))
    assert again.root == cache_a.root and again.build(entries, first.encode, "cpu") == 0  # same weights: reused
    cache_b = LatentCache(phantom_cfg, other, crop_size=phantom_cfg.crop_size, factor=(2, 2, 2))
    assert cache_b.root != cache_a.root
    assert cache_b.build(entries, other.encode, "cpu") == len(entries)  # other weights: encoded anew
    latent_a, _ = cache_a.read(entries[0])
    latent_b, _ = cache_b.read(entries[0])
    assert not np.allclose(latent_a, latent_b)
    other_settings = OmegaConf.merge(phantom_cfg, {"spacing": [1.0, 1.0, 1.0]})
    assert LatentCache(other_settings, first, crop_size=phantom_cfg.crop_size, factor=(2, 2, 2)).root != cache_a.root


def test_foreground_crops_contain_foreground(phantom_cfg, tmp_path):
    _, entries = prepared_entries(phantom_cfg, tmp_path)
    encoder = LocalEncoder()
    latent_cache = LatentCache(phantom_cfg, encoder, crop_size=phantom_cfg.crop_size, factor=(2, 2, 2))
    latent_cache.build(entries, encoder.encode, "cpu")
    dataset = LatentCropDataset(latent_cache, entries, centres=CropCentres(foreground_prob=1.0))
    torch.manual_seed(0)
    assert all(int(dataset[i % len(entries)]["label"].max()) > 0 for i in range(12))


def test_attach_swaps_training_crops_unless_augmenting(phantom_cfg, tmp_path):
    encoder = LocalEncoder()
    datamodule, _ = prepared_entries(phantom_cfg, tmp_path)
    waited = []
    dataset = attach_latent_cache(datamodule, encoder, device="cpu", factor=(2, 2, 2), build=True,
                                  barrier=lambda: waited.append(1))
    assert isinstance(datamodule.train_set, LatentCropDataset) and dataset is datamodule.train_set
    assert waited == [1]
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["latent"].shape == (2, 3, 8, 8, 4) and batch["label"].shape == (2, 1, 16, 16, 8)

    augmented = OmegaConf.merge(phantom_cfg, {"augment": {"gamma_prob": 0.5}})
    assert augmentation_active(augmented.augment) and not augmentation_active(phantom_cfg.augment)
    datamodule = VolumeDataModule(augmented, tmp_path / "run-aug")
    datamodule.setup()
    assert attach_latent_cache(datamodule, encoder, device="cpu", factor=(2, 2, 2), build=True) is None
    assert isinstance(datamodule.train_set, CropDataset)
