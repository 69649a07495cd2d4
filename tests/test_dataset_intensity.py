import numpy as np
import pytest
import torch

from dataset.intensity import CTWindowNormalizer, PercentileNormalizer, build_normalizer, reference_params
from utils.errors import UserError


def test_ct_window_is_a_fixed_map_to_minus_one_one():
    normalizer = build_normalizer({"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0})
    hu = np.array([-3000, -1000, -500, 0, 250, 1000, 2500], dtype=np.float32)
    normalised, _ = normalizer.forward(hu)
    np.testing.assert_allclose(normalised, [-1, -1, -0.5, 0, 0.25, 1, 1], atol=1e-6)
    # the same HU value maps to the same number in any volume (no per-volume or per-crop scaling)
    other, _ = normalizer.forward(np.array([0.0, 5000.0], np.float32))
    assert other[0] == normalised[3]


def test_ct_inverse_returns_hu_inside_the_window():
    normalizer = CTWindowNormalizer(hu_min=-1024.0, hu_max=2000.0)
    hu = np.random.default_rng(0).uniform(-1024, 2000, size=1000).astype(np.float32)
    normalised, params = normalizer.forward(hu)
    assert normalised.min() >= -1 and normalised.max() <= 1
    np.testing.assert_allclose(normalizer.inverse(normalised, params), hu, atol=0.05)
    np.testing.assert_allclose(normalizer.inverse(torch.from_numpy(normalised)).numpy(), hu, atol=0.05)


def test_percentile_params_make_the_map_invertible():
    rng = np.random.default_rng(1)
    volume = np.concatenate([np.zeros(5000), rng.gamma(4.0, 100.0, size=20000)]).astype(np.float32)
    normalizer = build_normalizer({"kind": "percentile", "lower": 0.5, "upper": 99.5})
    normalised, params = normalizer.forward(volume)
    low, high = np.percentile(volume, [0.5, 99.5])
    assert params["low"] == pytest.approx(low) and params["high"] == pytest.approx(high)
    assert normalised.min() == -1.0 and normalised.max() == 1.0
    inside = (volume >= low) & (volume <= high)
    np.testing.assert_allclose(normalizer.inverse(normalised, params)[inside], volume[inside], rtol=1e-4, atol=0.05)
    # a scaled copy of the volume normalises to the same values (per-volume scaling)
    np.testing.assert_allclose(normalizer.forward(volume * 3.0)[0], normalised, atol=1e-5)


def test_percentile_headroom_keeps_a_rare_bright_lesion():
    """A lesion brighter than the upper percentile (0.1 % of the voxels) is flattened to the brightest tissue
    without headroom and keeps its contrast with it; the map stays invertible up to 1 / (1 - headroom) x span."""
    rng = np.random.default_rng(2)
    volume = np.concatenate([np.zeros(30000), rng.normal(500.0, 10.0, 9960), np.full(40, 700.0)]).astype(np.float32)
    lesion = volume == 700.0
    tissue = ~lesion & (volume > 0)
    flat, _ = build_normalizer({"kind": "percentile", "lower": 0.5, "upper": 99.5}).forward(volume)
    assert flat[lesion].mean() - np.percentile(flat[tissue], 99) < 0.06   # flattened onto the brightest tissue
    kept_map = build_normalizer({"kind": "percentile", "lower": 0.5, "upper": 99.5, "headroom": 0.3})
    kept, params = kept_map.forward(volume)
    low, high = params["low"], params["high"]
    # low -> -1, high -> 1 - 2 x 0.3 = 0.4, so 700 (inside 1 / 0.7 of the span above low) is not clipped
    assert kept[volume == low].min() == pytest.approx(-1.0) and kept.max() < 1.0
    np.testing.assert_allclose(kept[lesion], -1.0 + 1.4 * (700.0 - low) / (high - low), rtol=1e-5)
    assert kept[lesion].mean() - np.percentile(kept[tissue], 99) > 0.3
    np.testing.assert_allclose(kept_map.inverse(kept, params), volume, rtol=1e-4, atol=0.05)
    spiked = np.where(lesion, 5000.0, volume).astype(np.float32)  # beyond the headroom: clipped
    assert (kept_map.forward(spiked)[0][lesion] == 1.0).all()
    with pytest.raises(UserError, match="headroom"):
        build_normalizer({"kind": "percentile", "lower": 0.5, "upper": 99.5, "headroom": 0.5})


def test_percentile_inverse_without_params_uses_the_reference():
    normalizer = PercentileNormalizer(lower=1.0, upper=99.0)
    with pytest.raises(ValueError, match="reference"):
        normalizer.inverse(np.zeros(3, np.float32))
    normalizer.reference = reference_params([{"low": 0.0, "high": 100.0}, {"low": 10.0, "high": 300.0},
                                             {"low": 20.0, "high": 200.0}])
    assert normalizer.reference == {"kind": "percentile", "low": 10.0, "high": 200.0}
    np.testing.assert_allclose(normalizer.inverse(np.array([-1.0, 0.0, 1.0])), [10.0, 105.0, 200.0])


@pytest.mark.parametrize("cfg, message", [
    ({"kind": "zscore"}, "unknown normalisation"),
    ({"kind": "ct_window", "hu_min": 100.0, "hu_max": -100.0}, "greater than"),
    ({"kind": "percentile", "lower": 0.5}, "missing upper"),
    ({"kind": "percentile", "lower": 0.5, "upper": 99.5, "hu_min": 0.0}, "not used: hu_min"),
])
def test_bad_intensity_config_is_a_user_error(cfg, message):
    with pytest.raises(UserError, match=message):
        build_normalizer(cfg)
