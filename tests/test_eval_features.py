"""Feature networks from local files only: loading, shapes, and skipping with a reason when weights are absent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet, resnet10

from evaluation import metrics
from evaluation.features import (
    InceptionSliceFeatures,
    LpipsModel,
    MedicalNetFeatures,
    SegmenterFeatures,
    WeightsUnavailable,
    slice_indices,
    unet_encoder_features,
    volume_slices,
    wheel_inception_path,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("build", [
    lambda: MedicalNetFeatures(None, depth=10, device=CPU),
    lambda: LpipsModel(None, device=CPU),
    lambda: SegmenterFeatures(None, device=CPU, domain="native"),
])
def test_absent_weights_give_a_reason(build):
    with pytest.raises(WeightsUnavailable, match="weights|segmenter"):
        build()


def test_missing_or_wrong_weight_files_give_a_reason(tmp_path):
    with pytest.raises(WeightsUnavailable, match="not found"):
        MedicalNetFeatures(tmp_path / "resnet_10.pth", depth=10, device=CPU)
    with pytest.raises(WeightsUnavailable, match="not found"):
        InceptionSliceFeatures(tmp_path / "inception.pt", device=CPU)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="not a loadable"):
        LpipsModel(garbage, device=CPU)
    with pytest.raises(WeightsUnavailable, match="not a loadable"):
        SegmenterFeatures(garbage, device=CPU, domain="native")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(WeightsUnavailable, match="tensors missing"):
        MedicalNetFeatures(other, depth=10, device=CPU)
    with pytest.raises(WeightsUnavailable, match="not a segmenter file"):
        SegmenterFeatures(other, device=CPU, domain="native")
    broken = tmp_path / "segmenter.pt"
    network = {"label_nc": 3, "channels": [4, 8], "strides": [2], "num_res_units": 1, "dropout": 0.0}
    torch.save({"kind": "segmenter", "network": network, "state_dict": {}}, broken)
    with pytest.raises(WeightsUnavailable, match="incomplete"):
        SegmenterFeatures(broken, device=CPU, domain="native")


def test_medicalnet_loads_a_local_checkpoint_in_its_original_layout(tmp_path):
    """MedicalNet .pth files hold {"state_dict": {"module.<name>": ...}} plus a segmentation head."""
    torch.manual_seed(0)
    reference = resnet10(pretrained=False, spatial_dims=3, n_input_channels=1, feed_forward=False,
                         shortcut_type="B", bias_downsample=False).eval()
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 2)  # extra head tensors are ignored
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": state}, path)
    extractor = MedicalNetFeatures(path, depth=10, device=CPU)
    volume = np.random.default_rng(0).normal(size=(24, 24, 16)).astype(np.float32) * 50 + 100
    features = extractor(volume)
    assert features.shape == (512,)
    z = (volume - volume.mean()) / (volume.std() + 1e-6)
    with torch.no_grad():
        expected = reference(torch.from_numpy(z)[None, None]).flatten().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_unet_encoder_features_pool_every_level():
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16, 32), strides=(2, 2, 2),
               num_res_units=1).eval()
    with torch.no_grad():
        features = unet_encoder_features(net, torch.randn(2, 1, 16, 16, 16))
    assert features.shape == (2, 4 + 8 + 16 + 32)


def test_lpips_model_from_a_local_torchscript_file(tmp_path):
    class MeanAbs(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    path = tmp_path / "lpips.pt"
    torch.jit.script(MeanAbs()).save(str(path))
    model = LpipsModel(path, device=CPU, batch_size=2)
    real = torch.zeros(3, 8, 8)
    fake = torch.full((3, 8, 8), 0.5)
    np.testing.assert_allclose(model(real, fake), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(model(real, real), [0.0, 0.0, 0.0])


def test_slice_sampling():
    assert slice_indices(10, None) == list(range(10))
    assert slice_indices(10, 20) == list(range(10))
    picked = slice_indices(33, 3)
    assert len(picked) == 3 and 0 < picked[0] < picked[1] < picked[2] < 32
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    slices = volume_slices(volume, axis=1, count=None)
    assert slices.shape == (5, 4, 6)
    np.testing.assert_array_equal(slices[2].numpy(), volume[:, 2, :])




def test_inception_from_the_wheel(one_thread):
    """The only test that runs the real Inception-v3 (about 1 s per slice on CPU): two slices."""
    assert wheel_inception_path() is not None and wheel_inception_path().is_file()
    extractor = InceptionSliceFeatures(device=CPU, batch_size=2)
    grid = torch.linspace(-1, 1, 64)
    slices = torch.stack([grid[None, :].expand(64, 64), torch.sin(6 * grid)[None, :] * torch.cos(6 * grid)[:, None]])
    features = extractor(slices)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    assert (features >= 0).all()  # pool features after ReLU
    assert metrics.frechet_distance_from_features(features, features) == pytest.approx(0.0, abs=1e-6)
    assert np.abs(features[0] - features[1]).sum() > 1.0  # different images, different features
