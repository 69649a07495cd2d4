import numpy as np
import pytest
from nibabel.affines import apply_affine

from dataset.geometry import (GridInfo, from_model_grid, is_oblique, model_grid_shape, orientation_codes,
                              to_model_grid, voxel_spacing)
from dataset.phantoms import phantom_affine

OBLIQUE = phantom_affine((0.8, 1.3, 2.5), "PIL", (20.0, -10.0, 35.0))
ANISOTROPIC = phantom_affine((0.7, 0.7, 4.0), "LPS")
AXIS_ALIGNED = phantom_affine((1.0, 2.0, 1.5), "SAR")


def _labels(shape, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.int16)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    for k in range(1, 4):
        centre = rng.uniform(0.25, 0.75, 3) * np.asarray(shape)
        radius = 0.22 * np.asarray(shape)
        label[(((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) < 1] = k
    return label


def _world_centroid(label, affine, k):
    return apply_affine(affine, np.argwhere(label == k).mean(axis=0))


def test_reorientation_is_an_exact_permutation_to_ras():
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = phantom_affine((1.0, 1.0, 1.0), "SAR")  # axes: S, A, R -> permute and keep signs
    ras, info = to_model_grid(array, affine, (1.0, 1.0, 1.0), is_label=False)
    assert orientation_codes(info.model_affine) == "RAS"
    np.testing.assert_array_equal(ras, array.transpose(2, 1, 0))
    lps = phantom_affine((1.0, 1.0, 1.0), "LPS")
    ras, info = to_model_grid(array, lps, (1.0, 1.0, 1.0), is_label=False)
    np.testing.assert_array_equal(ras, array[::-1, ::-1, :])
    # every voxel keeps its world position
    np.testing.assert_allclose(apply_affine(info.model_affine, [0, 0, 0]), apply_affine(lps, [3, 4, 0]))


@pytest.mark.parametrize("affine", [OBLIQUE, ANISOTROPIC, AXIS_ALIGNED], ids=["oblique", "anisotropic", "aligned"])
def test_labels_at_their_own_spacing_come_back_identical(affine):
    label = _labels((30, 26, 14))
    own = voxel_spacing(affine)[np.argsort(np.abs(affine[:3, :3]).argmax(axis=0))]  # in R, A, S order
    model, info = to_model_grid(label, affine, own, is_label=True)
    assert sorted(model.shape) == sorted(label.shape)
    np.testing.assert_allclose(info.model_spacing, own)
    back = from_model_grid(model, info, is_label=True)
    assert back.shape == label.shape and back.dtype == label.dtype
    np.testing.assert_array_equal(back, label)
    np.testing.assert_array_equal(info.original_affine, affine)


@pytest.mark.parametrize("affine", [OBLIQUE, ANISOTROPIC], ids=["oblique", "anisotropic"])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.5, 3.0)])
def test_round_trip_to_other_spacing_restores_grid_and_mostly_labels(affine, spacing):
    label = _labels((30, 26, 14), seed=1)
    model, info = to_model_grid(label, affine, spacing, is_label=True)
    np.testing.assert_allclose(info.model_spacing, spacing, rtol=1e-9)
    assert orientation_codes(info.model_affine) == "RAS"
    assert model.shape == model_grid_shape(affine, label.shape, spacing)
    for k in range(1, 4):  # same anatomy in world coordinates (within a voxel)
        shift = np.linalg.norm(_world_centroid(model, info.model_affine, k) - _world_centroid(label, affine, k))
        assert shift < max(spacing)
    back = from_model_grid(model, info, is_label=True)
    assert back.shape == label.shape
    assert (back == label).mean() > 0.9


def test_image_round_trip_is_close_and_dict_serialisable():
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (28, 24, 12)], indexing="ij"))
    image = (100 * np.cos(1.5 * grid[0]) * np.cos(grid[1]) + 50 * grid[2]).astype(np.float32)  # smooth
    model, info = to_model_grid(image, OBLIQUE, (1.0, 1.0, 1.0), is_label=False)
    assert model.dtype == np.float32
    info = GridInfo.from_dict(info.to_dict())
    back = from_model_grid(model, info, is_label=False)
    assert back.shape == image.shape
    inner = (slice(2, -2),) * 3
    assert np.abs(back - image)[inner].mean() < 2.0  # of a range of about 300


def test_oblique_detection():
    assert is_oblique(OBLIQUE) and not is_oblique(ANISOTROPIC) and not is_oblique(AXIS_ALIGNED)


def test_from_model_grid_rejects_arrays_not_on_the_model_grid():
    model, info = to_model_grid(_labels((10, 10, 10)), np.eye(4), (2.0, 2.0, 2.0), is_label=True)
    with pytest.raises(ValueError, match="not on the model grid"):
        from_model_grid(model[:-1], info, is_label=True)
