import os
import shutil

import numpy as np
import pytest

from dataset import cache, validate
from dataset.geometry import from_model_grid
from dataset.intensity import build_normalizer
from dataset.io import load_nifti
from dataset.layout import find_cases
from dataset.phantoms import write_phantom_dataset
from utils.errors import UserError


@pytest.fixture
def ct_data(tmp_path, compose_cfg, isolated_cache):
    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=2, shape=(20, 18, 10), spacing=(0.9, 0.9, 2.5), orientation="LPS",
                          rotation_deg=(0.0, 8.0, 0.0), label_nc=4, modality="ct")
    cfg = compose_cfg("check", ["dataset=nifti", f"dataset.root_dir={root}", "dataset.label_nc=4",
                                "dataset.spacing=[1.5,1.5,2.0]", f"dataset.name=cache_{tmp_path.name}"]).dataset
    return root, cfg


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_preprocessed_arrays_live_in_the_cache_and_are_memory_mapped(ct_data, isolated_cache):
    root, cfg = ct_data
    before = _files(root)
    case = find_cases(cfg)[0]
    entry = cache.load_preprocessed(case, cfg)
    assert _files(root) == before  # nothing written into the data folder
    folder = cache.entry_folder(case, cfg)
    assert folder.is_relative_to(isolated_cache / "medlsdm" / "preprocessed")
    assert folder.parent.name.startswith(f"{cfg.name}-") and folder.name.startswith("case000-")
    assert sorted(p.name for p in folder.iterdir()) == [
        "class_locations.npz", "foreground.npy", "image.npy", "label.npy", "meta.json"]
    assert isinstance(entry.image, np.memmap) and isinstance(entry.label, np.memmap)
    assert entry.image.dtype == np.float32 and entry.label.dtype == np.uint8
    assert entry.image.shape == entry.label.shape == tuple(entry.grid_info.model_shape)
    assert -1.0 <= entry.image.min() and entry.image.max() <= 1.0
    assert np.all(entry.label[tuple(entry.foreground.T)] > 0)
    np.testing.assert_allclose(entry.grid_info.model_spacing, [1.5, 1.5, 2.0])


def test_cached_case_maps_back_to_hu_on_the_original_grid(ct_data):
    root, cfg = ct_data
    case = find_cases(cfg)[0]
    entry = cache.load_preprocessed(case, cfg)
    hu = build_normalizer(cfg.intensity).inverse(np.asarray(entry.image), entry.intensity_params)
    back = from_model_grid(hu, entry.grid_info, is_label=False)
    label_back = from_model_grid(np.asarray(entry.label), entry.grid_info, is_label=True)
    original, affine = load_nifti(case.image_path)
    original_label, _ = load_nifti(case.label_path)
    assert back.shape == original.shape and np.array_equal(entry.grid_info.original_affine, affine)
    inner = (slice(3, -3), slice(3, -3), slice(2, -2))
    background = (original_label == 0)[inner]
    # away from edges the background HU comes back within the phantom noise (15 HU) plus interpolation
    assert abs(float(np.median(back[inner][background] - original[inner][background]))) < 15
    assert (label_back == original_label).mean() > 0.85


def test_cache_is_reused_while_files_are_unchanged_and_refreshed_when_they_change(ct_data, monkeypatch):
    root, cfg = ct_data
    case = find_cases(cfg)[0]
    cache.load_preprocessed(case, cfg)
    first = cache.entry_folder(case, cfg)

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("cache miss")

    with monkeypatch.context() as patch:
        patch.setattr(cache, "preprocess_case", no_preprocessing)
        patch.setattr(validate, "load_checked_case", no_preprocessing)
        cache.load_preprocessed(case, cfg)  # reused
        validate.check_case(case, cfg)  # stats of the unchanged, already checked pair
    stat = case.image_path.stat()
    os.utime(case.image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    case = find_cases(cfg)[0]
    cache.load_preprocessed(case, cfg)
    second = cache.entry_folder(case, cfg)
    assert second != first and second.is_dir() and not first.exists()  # stale entry removed


def test_settings_change_the_cache_folder(ct_data, edit_cfg):
    _, cfg = ct_data
    other = edit_cfg(cfg, {"spacing": [2.0, 2.0, 2.0]})
    assert cache.cache_folder(cfg) != cache.cache_folder(other)
    assert cache.cache_folder(cfg) == cache.cache_folder(edit_cfg(cfg, {"batch_size": 7}))


def test_cache_inside_the_data_folder_is_refused(ct_data, edit_cfg):
    root, cfg = ct_data
    inside = edit_cfg(cfg, {"cache_dir": str(root / "cache")})
    with pytest.raises(UserError, match="must not be inside the data folder"):
        validate.validate_dataset(inside)
    with pytest.raises(UserError, match="must not live inside the data folder"):
        cache.load_preprocessed(find_cases(inside)[0], inside)
    assert not (root / "cache").exists() or not any((root / "cache").rglob("*.npy"))
    shutil.rmtree(root / "cache", ignore_errors=True)
