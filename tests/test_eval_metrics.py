"""Metrics against values known by construction (and against independent implementations)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric
from skimage.metrics import structural_similarity

from evaluation import metrics


def smooth_volume(shape, seed=0):
    """Smooth random field in [-1, 1]: structured like an image, unlike white noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(-1, 1, size=[max(2, s // 4) for s in shape]))[None, None]
    fine = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)
    return fine[0, 0].numpy()


@pytest.mark.parametrize("size,sigma", [(11, 1.5), (7, 1.5 * 7 / 11), (3, 0.5)])
def test_ssim_window_sums_to_one(size, sigma):
    window = metrics.gaussian_window_3d(size, sigma)
    assert window.shape == (size, size, size)
    assert window.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert window.argmax().item() == (size**3) // 2  # peak at the centre


def test_identical_volumes_give_perfect_scores():
    volume = smooth_volume((40, 36, 32))
    assert metrics.ssim3d(volume, volume, data_range=2.0) == pytest.approx(1.0, abs=1e-9)
    assert metrics.ms_ssim3d(volume, volume, data_range=2.0) == pytest.approx(1.0, abs=1e-9)
    assert metrics.psnr(volume, volume, data_range=2.0) == math.inf
    assert metrics.rmse(volume, volume) == 0.0 and metrics.mae(volume, volume) == 0.0


def test_independent_noise_has_ssim_near_zero():
    rng = np.random.default_rng(1)
    real = rng.uniform(-1, 1, (48, 48, 32))
    noise = rng.uniform(-1, 1, (48, 48, 32))
    assert abs(metrics.ssim3d(real, noise, data_range=2.0)) < 0.02
    assert metrics.ms_ssim3d(real, noise, data_range=2.0) < 0.1
    structured = smooth_volume((48, 48, 32))
    assert abs(metrics.ssim3d(structured, noise, data_range=2.0)) < 0.05


def test_ssim_matches_skimage_and_monai():
    real = smooth_volume((30, 28, 26), seed=2)
    fake = real + np.random.default_rng(3).normal(0, 0.1, real.shape)
    ours = metrics.ssim3d(real, fake, data_range=2.0)
    reference = structural_similarity(real, fake, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert ours == pytest.approx(reference, abs=1e-10)
    monai_value = SSIMMetric(spatial_dims=3, data_range=2.0, win_size=11, kernel_sigma=1.5)(
        torch.from_numpy(fake)[None, None], torch.from_numpy(real)[None, None]).item()
    assert ours == pytest.approx(monai_value, abs=1e-6)
    assert 0.3 < ours < 0.99


def test_ms_ssim_adapts_to_32_slice_crops_and_matches_monai():
    assert metrics.ms_ssim_settings((256, 256, 32)) == (7, 3)
    assert metrics.ms_ssim_settings((176, 176, 176)) == (11, 5)
    assert metrics.ms_ssim_settings((64, 64, 16)) == (7, 2)
    with pytest.raises(ValueError, match="does not fit"):
        metrics.ms_ssim_settings((64, 64, 32), kernel_size=11, scales=3)
    real = smooth_volume((64, 64, 32), seed=4)
    fake = real + np.random.default_rng(5).normal(0, 0.2, real.shape)
    ours = metrics.ms_ssim3d(real, fake, data_range=2.0)
    weights = np.asarray(metrics.MS_SSIM_WEIGHTS[:3])
    monai_value = MultiScaleSSIMMetric(spatial_dims=3, data_range=2.0, kernel_size=7, kernel_sigma=1.5 * 7 / 11,
                                       weights=tuple(weights / weights.sum()))(
        torch.from_numpy(fake)[None, None], torch.from_numpy(real)[None, None]).item()
    assert ours == pytest.approx(monai_value, abs=1e-6)
    assert 0.2 < ours < 1.0


def test_psnr_of_known_error_matches_formula():
    real = smooth_volume((32, 32, 16))
    offset = 0.05
    assert metrics.psnr(real, real + offset, data_range=2.0) == pytest.approx(20 * math.log10(2.0 / offset))
    assert metrics.rmse(real, real + offset) == pytest.approx(offset)
    assert metrics.mae(real, real - offset) == pytest.approx(offset)
    sigma = 0.1
    noisy = real + np.random.default_rng(6).normal(0, sigma, real.shape)
    assert metrics.psnr(real, noisy, data_range=2.0) == pytest.approx(10 * math.log10(4.0 / sigma**2), abs=0.1)


def test_ssim_measures_signed_intensities_from_the_low_end_of_the_range():
    """Tissue near 0 in [-1, 1] (or soft tissue near 0 HU): a synthetic copy 0.1 darker is a small error in a
    range of 2, yet SSIM on the signed values goes negative (local means of opposite sign); measured from
    low=-1 it costs under 1 %, and the same holds in HU measured from -1000."""
    rng = np.random.default_rng(9)
    texture = rng.normal(0, 0.02, (24, 24, 24))
    real, fake = 0.05 + texture, -0.05 + texture
    assert metrics.ssim3d(real, fake, data_range=2.0) < 0
    assert metrics.ssim3d(real, fake, data_range=2.0, low=-1.0) > 0.99
    assert metrics.ms_ssim3d(real, fake, data_range=2.0, scales=2, kernel_size=7) == 0.0  # clipped at 0
    assert metrics.ms_ssim3d(real, fake, data_range=2.0, low=-1.0, scales=2, kernel_size=7) > 0.99
    assert metrics.ssim3d(real * 1000, fake * 1000, data_range=2000.0, low=-1000.0) == pytest.approx(
        metrics.ssim3d(real, fake, data_range=2.0, low=-1.0), abs=1e-9)
    # a constant shift of both volumes changes nothing once measured from the same low end
    assert metrics.ssim3d(real + 0.5, fake + 0.5, data_range=2.0, low=-0.5) == pytest.approx(
        metrics.ssim3d(real, fake, data_range=2.0, low=-1.0), abs=1e-12)


def test_data_range_native_units_vs_normalised():
    """HU in [-1000, 1000] with data range 2000 gives the same SSIM/PSNR as the same data scaled to [-1, 1]
    with data range 2; the published bug (range 255 on [-1, 1] data) does not."""
    normalised = smooth_volume((40, 40, 24), seed=7)
    fake_normalised = normalised + np.random.default_rng(8).normal(0, 0.1, normalised.shape)
    hu, fake_hu = normalised * 1000.0, fake_normalised * 1000.0
    assert metrics.ssim3d(hu, fake_hu, data_range=2000.0) == pytest.approx(
        metrics.ssim3d(normalised, fake_normalised, data_range=2.0), abs=1e-9)
    assert metrics.ms_ssim3d(hu, fake_hu, data_range=2000.0) == pytest.approx(
        metrics.ms_ssim3d(normalised, fake_normalised, data_range=2.0), abs=1e-9)
    assert metrics.psnr(hu, fake_hu, data_range=2000.0) == pytest.approx(
        metrics.psnr(normalised, fake_normalised, data_range=2.0), abs=1e-9)
    assert metrics.ssim3d(normalised, fake_normalised, data_range=255.0) > \
        metrics.ssim3d(normalised, fake_normalised, data_range=2.0) + 0.05
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(hu, fake_hu, data_range=0)


def test_masked_metrics_use_only_the_foreground():
    real = smooth_volume((32, 32, 16))
    mask = np.zeros(real.shape, bool)
    mask[8:24, 8:24, 4:12] = True
    fake = real.copy()
    fake[~mask] += 0.5  # errors only outside the mask
    assert metrics.mae(real, fake, mask=mask) == 0.0
    assert metrics.psnr(real, fake, data_range=2.0, mask=mask) == math.inf
    assert metrics.mae(real, fake) == pytest.approx(0.5 * (~mask).mean())
    fake_inside = real.copy()
    fake_inside[mask] += 0.5
    assert metrics.ssim3d(real, fake_inside, data_range=2.0, mask=mask, kernel_size=5) < \
        metrics.ssim3d(real, fake_inside, data_range=2.0, kernel_size=5)


def test_frechet_distance_of_identical_sets_is_zero():
    features = np.random.default_rng(9).normal(size=(50, 8))
    assert metrics.frechet_distance_from_features(features, features) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_gaussians_through_linear_map_matches_closed_form():
    """x ~ N(m_i, diag(d_i)), features f = A x with A orthogonal times a scale: the covariances A D_i A^T
    commute, so FD = |A (m1 - m2)|^2 + sum (sqrt(s^2 d1) - sqrt(s^2 d2))^2."""
    rng = np.random.default_rng(10)
    dim = 4
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scale = 1.5
    a = scale * q
    m1, m2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 0.0, -1.0, 1.0])
    d1, d2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    closed_form = float(np.sum((a @ (m1 - m2)) ** 2) + np.sum((scale * np.sqrt(d1) - scale * np.sqrt(d2)) ** 2))
    exact = metrics.frechet_distance(a @ m1, a @ np.diag(d1) @ a.T, a @ m2, a @ np.diag(d2) @ a.T)
    assert exact == pytest.approx(closed_form, rel=1e-10)
    n = 200_000
    f1 = (m1 + rng.normal(size=(n, dim)) * np.sqrt(d1)) @ a.T
    f2 = (m2 + rng.normal(size=(n, dim)) * np.sqrt(d2)) @ a.T
    assert metrics.frechet_distance_from_features(f1, f2) == pytest.approx(closed_form, rel=0.02)


def test_frechet_distance_matches_scipy_sqrtm_and_handles_rank_deficiency():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mu1, s1 = metrics.feature_statistics(x)
    mu2, s2 = metrics.feature_statistics(y)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    reference = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    few = rng.normal(size=(5, 64))  # fewer samples than features: singular covariances
    value = metrics.frechet_distance_from_features(few, few + 1.0)
    assert np.isfinite(value) and value == pytest.approx(64.0, rel=1e-6)  # pure mean shift of 1 per feature


def test_mmd_identical_and_gaussian_closed_form():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(300, 3))
    assert metrics.mmd_squared(x, x, bandwidth=1.0) < 0.01
    dim, s, width = 3, 1.0, 2.0
    delta = np.array([1.0, 0.0, 0.0])
    # E k(x, y) with x - y ~ N(delta, 2 s^2 I) for the kernel exp(-|z|^2 / (2 width^2))
    factor = (width**2 / (width**2 + 2 * s**2)) ** (dim / 2)
    expected = 2 * factor * (1 - np.exp(-np.sum(delta**2) / (2 * (width**2 + 2 * s**2))))
    a = rng.normal(size=(1500, dim)) * s
    b = rng.normal(size=(1500, dim)) * s + delta
    assert metrics.mmd_squared(a, b, bandwidth=width) == pytest.approx(expected, abs=0.01)
    assert metrics.median_bandwidth(a, b) > 0


def test_dice_excludes_background():
    target = np.zeros((10, 10, 10), int)
    target[2:5, 2:5, 2:5] = 1
    target[6:9, 6:9, 6:9] = 2
    same = metrics.dice_per_class(target, target, 3)
    assert same == {1: 1.0, 2: 1.0}
    assert metrics.mean_dice(same) == 1.0
    disjoint = np.zeros_like(target)
    disjoint[0:2, 0:2, 0:2] = 1
    disjoint[9:10, 0:2, 0:2] = 2
    assert metrics.dice_per_class(disjoint, target, 3) == {1: 0.0, 2: 0.0}
    # all-background prediction agrees on 94 % of voxels, but Dice over the classes is 0
    assert metrics.mean_dice(metrics.dice_per_class(np.zeros_like(target), target, 3)) == 0.0
    half = target.copy()
    half[2:5, 2:5, 2:3] = 0  # one third of class 1 missing
    assert metrics.dice_per_class(half, target, 3)[1] == pytest.approx(2 * 18 / (18 + 27))
    absent = metrics.dice_per_class(target, target, 4)
    assert math.isnan(absent[3]) and metrics.mean_dice(absent) == 1.0
