"""layers.tiling.tiled_apply and the stage-1 reconstruction through it: the one blending scheme (sin^2 ramps)
reproduces a voxel-wise function exactly, keeps every input's tiles aligned, and a single window is the plain call."""
import numpy as np
import pytest
import torch

from layers.tiling import TileGrid, tiled_apply
from vq_gan_3d.reconstruct import reconstruct_normalised


class VoxelwiseModel(torch.nn.Module):
    """A stand-in stage 1 whose output at a voxel depends only on that voxel: blending must give it back exactly."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, image, label=None):
        self.calls.append(tuple(image.shape[2:]))
        out = 0.5 * image if label is None else 0.1 * label.float() - 0.5
        return out, {}


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiled_apply_of_a_voxelwise_function_is_the_function(overlap):
    x = torch.randn(2, 3, 13, 9, 7, dtype=torch.float64)
    other = torch.randn(2, 1, 13, 9, 7, dtype=torch.float64)
    window = (6, 4, 7)
    out = tiled_apply(lambda a, b: a * b, x, other, window=window, overlap=overlap)
    torch.testing.assert_close(out, (x * other).float())
    assert len(TileGrid.covering(x.shape[2:], window, overlap)) > 1  # really tiled


@pytest.mark.parametrize("tiles_per_call", [2, 3, 100])
def test_tiles_stacked_into_one_call_blend_as_one_tile_per_call(tiles_per_call):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.Conv3d(4, 2, 1))
    x = torch.randn(2, 1, 13, 9, 7)
    calls = []
    counted = lambda t: calls.append(t.shape[0]) or net(t)  # noqa: E731
    single = tiled_apply(net, x, window=(6, 4, 7), overlap=0.25)
    stacked = tiled_apply(counted, x, window=(6, 4, 7), overlap=0.25, tiles_per_call=tiles_per_call)
    torch.testing.assert_close(stacked, single)
    n_tiles = len(TileGrid.covering(x.shape[2:], (6, 4, 7), 0.25))
    assert sum(calls) == 2 * n_tiles and len(calls) == -(-n_tiles // tiles_per_call)  # every tile once, batched


def test_a_none_input_is_passed_as_none():
    x = torch.arange(64.0).reshape(1, 1, 4, 4, 4)
    out = tiled_apply(lambda a, b: a + (0 if b is None else 100), x, None, window=(2, 4, 4), overlap=0.5)
    torch.testing.assert_close(out, x)


def test_reconstruction_tiles_the_image_and_its_label_together_and_unpads():
    model = VoxelwiseModel()
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (20, 7, 6)).astype(np.float32)
    label = rng.integers(0, 5, (20, 7, 6))
    window = [8, 8, 8]
    recon = reconstruct_normalised(model, image, None, window=window, overlap=0.25, device=torch.device("cpu"))
    np.testing.assert_allclose(recon, 0.5 * image, atol=1e-6)
    assert recon.shape == image.shape
    assert set(model.calls) == {(8, 8, 8)} and len(model.calls) == 3  # Y and Z padded to the window, X in 3 tiles
    with_label = reconstruct_normalised(model, image, label, window=window, overlap=0.25, device=torch.device("cpu"))
    np.testing.assert_allclose(with_label, 0.1 * label - 0.5, atol=1e-6)


def test_a_window_covering_the_volume_is_the_plain_call():
    model = VoxelwiseModel()
    image = np.linspace(-1, 1, 8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)
    recon = reconstruct_normalised(model, image, None, window=[8, 8, 4], overlap=0.5, device=torch.device("cpu"))
    assert np.array_equal(recon, 0.5 * image) and model.calls == [(8, 8, 4)]
