"""Whole volumes through windows: the window layout and weights, exactness when one window covers everything,
equivariant denoisers through any windows, seams measured on a trained model, the tiled stage-1 networks, and
`ddpm.sample` on label maps larger than the training crop (and its partial-noise starts)."""
from __future__ import annotations

import itertools
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset.io import save_nifti

from ddpm.latent_diffusion import make_denoiser, sample
from ddpm.sample import run as run_sample
from ddpm.samplers import SamplerSettings, partial_start, run_sampler
from ddpm.windowed import WindowedDenoiser, checkpoint_window, parse_window, unet_window_denoiser
from layers.tiling import TileGrid, axis_weights, decode_tiled, encode_tiled, window_weight
from ddpm_tiny import save_tiny_diffusion, tiny_diffusion, tiny_vqgan
from fullvolume_phantom import SHAPE, phantom_images, trained_phantom_model, wide_labels
from utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape,window,overlap", [((20, 13, 8), (8, 8, 8), 0.25), ((24, 12, 8), (12, 12, 8), 0.5),
                                                  ((9, 31, 5), (4, 6, 2), 0.0), ((16, 16, 16), (4, 4, 4), 0.75)])
def test_windows_cover_the_volume_and_weights_are_positive_and_normalised(shape, window, overlap):
    grid = TileGrid.covering(shape, window, overlap)
    covered = torch.zeros(shape, dtype=torch.int64)
    total = torch.zeros(shape, dtype=torch.float64)
    tables = grid.weight_tables(dtype=torch.float64)
    for corner in grid.corners():
        weight = window_weight(tables, corner)[0, 0]
        assert weight.shape == grid.size and bool((weight > 0).all())
        covered[grid.slices(corner)] += 1
        total[grid.slices(corner)] += weight
    assert bool((covered >= 1).all())
    torch.testing.assert_close(total, torch.ones(shape, dtype=torch.float64))  # normalised blend
    for length, size, starts in zip(shape, grid.size, grid.starts):
        assert starts[0] == 0 and starts[-1] + size == length
        for a, b in zip(starts, starts[1:]):
            assert a + size - b >= math.ceil(overlap * size)  # neighbours share at least the overlap


def test_ramps_of_neighbours_form_a_partition_of_unity_and_volume_edges_get_no_ramp():
    raw = axis_weights(20, 8, [0, 6, 12])
    first, middle, last = raw
    # the first window is not faded at the volume's edge, and its weights there are exactly 1
    torch.testing.assert_close(first[:6], torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(last[-6:], torch.ones(6, dtype=torch.float64))
    # over the two shared voxels the weights fall off towards each window's edge and sum to one
    assert first[6] > first[7] and middle[0] < middle[1]
    torch.testing.assert_close(first[6:] + middle[:2], torch.ones(2, dtype=torch.float64))
    assert TileGrid.covering((8, 8, 8), (8, 16, 9), 0.5).is_single


@pytest.mark.parametrize("decoder,guidance", [("spade", 1.0), ("spade", 2.5), ("normal", 1.0)])
def test_a_window_covering_the_latent_is_exactly_the_plain_denoiser(decoder, guidance):
    unet = tiny_diffusion(decoder=decoder).ema_unet
    label = torch.randint(0, 3, (2, 1, 16, 12, 8), generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 8, 6, 4, generator=torch.Generator().manual_seed(1))
    for window in ((8, 6, 4), (64, 64, 64)):
        windowed = unet_window_denoiser(unet, label, window=window, overlap=0.5, guidance_scale=guidance)
        plain = make_denoiser(unet, label, guidance)
        with torch.no_grad():
            assert torch.equal(windowed(x, 17), plain(x, 17))
    settings = SamplerSettings("ddim", 4)
    with torch.no_grad():
        reference = sample(unet, tiny_schedule(), label, (4, 8, 6, 4), settings=settings, guidance_scale=guidance,
                           generator=torch.Generator().manual_seed(3))
        noise = torch.randn((2, 4, 8, 6, 4), generator=torch.Generator().manual_seed(3))
        windowed = run_sampler(settings, unet_window_denoiser(unet, label, window=(8, 8, 8), overlap=0.25,
                                                              guidance_scale=guidance), noise, tiny_schedule())
    assert torch.equal(windowed, reference)


def tiny_schedule():
    return tiny_diffusion().schedule


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_equivariant_denoisers_give_the_same_result_through_any_windows(overlap):
    """A denoiser whose output at a voxel depends only on that voxel (and on the label there) is the same
    whether it runs on the whole latent or on blended windows; the label crops line up with the windows."""
    factor = (2, 2, 1)
    label = torch.randint(0, 3, (1, 1, 40, 24, 12), generator=torch.Generator().manual_seed(2))

    def denoiser_for(label_crop):
        per_latent_voxel = F.avg_pool3d(label_crop.float(), kernel_size=factor)
        return lambda x, t: torch.tanh(x) * (1 + per_latent_voxel) + 0.01 * t

    x = torch.randn(1, 3, 20, 12, 12, generator=torch.Generator().manual_seed(4))
    whole = denoiser_for(label)(x, 7)
    grid = TileGrid.covering((20, 12, 12), (8, 4, 4), overlap, multiple=4)
    windowed = WindowedDenoiser(denoiser_for, label, grid, factor=factor)
    kept = WindowedDenoiser(denoiser_for, label, grid, factor=factor, keep_conditions=True)
    batched = WindowedDenoiser(denoiser_for, label, grid, factor=factor, windows_per_call=4)
    for denoiser, windows in ((windowed, 1), (kept, 1), (batched, 4)):
        for _ in range(2):
            out = denoiser(x, 7)
            assert bool(torch.isfinite(out).all())
            torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
        assert denoiser.max_call_voxels == windows * 8 * 4 * 4  # no network call saw more than its windows
    assert len(kept._kept) == len(grid) and not windowed._kept and len(batched.groups) == math.ceil(len(grid) / 4)


def test_unet_on_windows_smaller_than_the_latent_is_finite_and_bounded():
    unet = tiny_diffusion().ema_unet
    label = torch.randint(0, 3, (1, 1, 40, 16, 8), generator=torch.Generator().manual_seed(0))
    denoiser = unet_window_denoiser(unet, label, window=(8, 8, 4), overlap=0.25, guidance_scale=2.0)
    x = torch.randn(1, 4, 20, 8, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = denoiser(x, 30)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert denoiser.max_call_voxels == 8 * 8 * 4 and len(denoiser.grid) == 3
    batched = unet_window_denoiser(unet, label, window=(8, 8, 4), overlap=0.25, guidance_scale=2.0,
                                   windows_per_call=2)
    with torch.no_grad():
        torch.testing.assert_close(batched(x, 30), out, rtol=1e-4, atol=1e-5)  # same windows, batched
    with pytest.raises(ValueError, match="multiple of 2"):
        unet_window_denoiser(unet, label, window=(7, 8, 4), overlap=0.25)


def border_to_inside_gradient_ratio(volume: torch.Tensor, labels: torch.Tensor, borders: list[int]) -> float:
    """Mean |x[i+1] - x[i]| along X across the given window borders over that elsewhere, counting only pairs of
    background voxels (label edges are real edges)."""
    steps = (volume[:, :, 1:] - volume[:, :, :-1]).abs()
    background = (labels[:, :, 1:] == 0) & (labels[:, :, :-1] == 0)
    across = torch.zeros_like(background)
    for position in borders:
        across[:, :, position - 1] = True
    return float(steps[across & background].mean() / steps[~across & background].mean())


def test_blended_windows_leave_no_seam_where_separate_windows_do():
    """On volumes two training crops wide, windows denoised apart (no overlap) disagree at their border; blended
    at every step they do not. The seam is measured, not assumed: gradients across window borders vs inside."""
    unet, schedule = trained_phantom_model()
    labels = wide_labels(6, torch.Generator().manual_seed(11))
    noise = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2))
    ratios = {}
    for overlap in (0.0, 0.5):
        denoiser = unet_window_denoiser(unet, labels, window=SHAPE, overlap=overlap)
        with torch.no_grad():
            volume = run_sampler(SamplerSettings("ddim", 20), denoiser, noise, schedule)
        assert bool(torch.isfinite(volume).all())
        ratios[overlap] = border_to_inside_gradient_ratio(volume, labels, denoiser.grid.border_positions()[0])
    assert ratios[0.5] < 1.3, ratios
    assert ratios[0.0] > 1.5 * ratios[0.5], ratios


@pytest.mark.parametrize("spade", [False, True])
def test_tiled_stage1_networks_match_the_whole_volume_and_stay_within_a_tile(spade):
    vqgan = tiny_vqgan(label_nc=3 if spade else None)
    image = torch.rand(1, 1, 24, 16, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    label = torch.randint(0, 3, (1, 1, 24, 16, 8), generator=torch.Generator().manual_seed(1)) if spade else None
    seen = []

    def decode(z, lab):
        seen.append(tuple(z.shape[2:]))
        return vqgan.decode(z, lab)

    with torch.no_grad():
        latent = vqgan.encode(image)
        whole = vqgan.decode(latent, label)
        covering = decode_tiled(decode, latent, label, factor=(2, 2, 2), tile=(12, 8, 4), overlap=0.25)
        assert torch.equal(covering, whole)
        assert torch.equal(encode_tiled(vqgan.encode, image, factor=(2, 2, 2), tile=(64, 64, 64), overlap=0.25),
                           latent)
        seen.clear()
        tiled = decode_tiled(decode, latent, label, factor=(2, 2, 2), tile=(4, 4, 4), overlap=0.25,
                             out_device="cpu")
        tiled_latent = encode_tiled(vqgan.encode, image, factor=(2, 2, 2), tile=(4, 4, 4), overlap=0.25)
    assert tiled.shape == whole.shape and tiled_latent.shape == latent.shape
    assert bool(torch.isfinite(tiled).all()) and bool(torch.isfinite(tiled_latent).all())
    assert max(math.prod(s) for s in seen) <= 4 * 4 * 4 and len(seen) == 4 * 3 * 1


def test_tiles_line_up_with_their_image_region_and_label_crop():
    """With local stand-ins for the networks (each output voxel depends only on its own latent voxel and label
    patch), tiled decoding and encoding equal the whole-volume result: tiles, label crops and weights line up."""
    factor = (2, 2, 1)
    label = torch.randint(0, 3, (1, 1, 24, 16, 6), generator=torch.Generator().manual_seed(1))
    latent = torch.randn(1, 4, 12, 8, 6, generator=torch.Generator().manual_seed(2))

    def decode(z, lab):
        up = z.sum(1, keepdim=True).repeat_interleave(2, 2).repeat_interleave(2, 3)
        return torch.sin(up) + lab.float()

    def encode(image):
        return torch.cat([F.avg_pool3d(image, factor), F.max_pool3d(image, factor)], dim=1)

    whole = decode(latent, label)
    tiled = decode_tiled(decode, latent, label, factor=factor, tile=(4, 3, 2), overlap=0.5)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encode_tiled(encode, whole, factor=factor, tile=(5, 3, 4), overlap=0.25),
                               encode(whole), rtol=1e-5, atol=1e-5)


def test_window_settings():
    model = tiny_diffusion()
    meta = {"dataset": {"crop_size": [16, 16, 8]}}
    assert checkpoint_window(None, model, meta) == (8, 8, 4)  # the training crop's latent (x2 stage 1)
    assert checkpoint_window((6, 4, 2), model, meta) == (6, 4, 2)
    with pytest.raises(UserError, match="multiple of 2"):
        checkpoint_window((5, 4, 2), model, meta)
    assert parse_window(None) is None and parse_window(8) == (8, 8, 8) and parse_window([4, 6, 2]) == (4, 6, 2)
    assert TileGrid.covering((20, 16, 6), parse_window("whole"), 0.25, multiple=2).is_single
    for bad in ([4, 4], [4, 0, 4], "big", [4.5, 4, 4]):
        with pytest.raises(UserError, match="window="):
            parse_window(bad)
    for window, overlap in itertools.product([(4, 4, 4)], [-0.1, 1.0]):
        with pytest.raises(ValueError, match="overlap"):
            TileGrid.covering((8, 8, 8), window, overlap)


# the synthesis CLI --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_label_map(tmp_path_factory):
    """A label map whose latent (20x16x6) is larger than the tiny checkpoint's training window (8x8x4)."""
    folder = tmp_path_factory.mktemp("fullvolume")
    label = np.random.default_rng(0).integers(0, 3, size=(40, 30, 12)).astype(np.uint8)
    image = np.random.default_rng(1).normal(100, 20, size=label.shape).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return {"ckpt": save_tiny_diffusion(folder / "diff.ckpt", tiny_diffusion(label_nc=3)),
            "labels": save_nifti(label, affine, folder / "big.nii.gz"),
            "real": save_nifti(image, affine, folder / "real.nii.gz"),
            "other": save_nifti(image[:, :, :10], affine, folder / "other.nii.gz")}


def synthesise(compose_cfg, files, out, *extra) -> tuple[np.ndarray, dict]:
    cfg = compose_cfg("sample", [f"ckpt={files['ckpt']}", f"labels={files['labels']}", f"out={out}",
                                 "sampler=ddim", "steps=4", *extra])
    path = run_sample(cfg)[0]
    return np.asarray(nib.load(str(path)).dataobj), json.loads(path.with_name(path.name[:-7] + ".json").read_text())


def test_sample_cli_windows_label_maps_larger_than_the_training_crop(compose_cfg, big_label_map, tmp_path):
    windowed, sidecar = synthesise(compose_cfg, big_label_map, tmp_path / "a")
    assert sidecar["window"] == [8, 8, 4] and sidecar["windows"] == 18  # the default: the training crop's latent
    again, _ = synthesise(compose_cfg, big_label_map, tmp_path / "b")
    whole, whole_sidecar = synthesise(compose_cfg, big_label_map, tmp_path / "c", "window=[64,64,64]")
    assert whole_sidecar["windows"] == 1 and whole_sidecar["window"] == [20, 16, 6]
    named, named_sidecar = synthesise(compose_cfg, big_label_map, tmp_path / "d", "window=whole")
    assert named_sidecar["window"] == [20, 16, 6] and named_sidecar["windows"] == 1
    np.testing.assert_array_equal(named, whole)  # window=whole is one window covering the latent
    source = nib.load(str(big_label_map["labels"]))
    for volume in (windowed, whole):
        assert volume.shape == source.shape and np.isfinite(volume).all() and volume.std() > 0
    np.testing.assert_array_equal(windowed, again)  # same seed, same output
    assert not np.array_equal(windowed, whole)


def test_sample_cli_starts_from_a_real_scan(compose_cfg, big_label_map, tmp_path):
    plain, _ = synthesise(compose_cfg, big_label_map, tmp_path / "plain", "steps=10")
    started, sidecar = synthesise(compose_cfg, big_label_map, tmp_path / "init", "steps=10",
                                  f"init_image={big_label_map['real']}", "strength=0.5")
    assert sidecar["strength"] == 0.5 and sidecar["init_image"] == "real.nii.gz"
    assert started.shape == plain.shape and np.isfinite(started).all() and not np.array_equal(started, plain)
    other = tmp_path / "other_real.nii.gz"
    save_nifti(np.random.default_rng(5).normal(300, 50, size=plain.shape).astype(np.float32),
               np.diag([2.0, 2.0, 2.0, 1.0]), other)
    from_other, _ = synthesise(compose_cfg, big_label_map, tmp_path / "other", "steps=10", f"init_image={other}",
                               "strength=0.5")
    assert not np.array_equal(from_other, started)  # the start really is the given scan


def test_partial_noise_starts_keep_the_real_scans_appearance():
    """The partial-noise start on the trained phantom model: started from a real scan whose background level is far
    from the model's usual one, samples keep that level (the label map does not give it) the lower the strength."""
    unet, schedule = trained_phantom_model()
    labels = wide_labels(2, torch.Generator().manual_seed(3), tiles=1)
    real = phantom_images(labels, torch.Generator().manual_seed(4), levels=torch.tensor([-0.8, -0.3]))
    denoise = make_denoiser(unet, labels, 1.0)
    distance = {}
    for strength in (1.0, 0.3):
        gen = torch.Generator().manual_seed(0)
        start = partial_start(schedule, real, torch.randn(real.shape, generator=gen), steps=20, strength=strength)
        with torch.no_grad():
            out = run_sampler(SamplerSettings("ddim", 20), denoise, start, schedule, strength=strength,
                              generator=gen)
        distance[strength] = float((out - real).abs().mean())
    assert distance[0.3] < 0.5 * distance[1.0], distance


def test_sample_cli_window_and_partial_noise_errors(compose_cfg, big_label_map, tmp_path):
    out = tmp_path / "out"
    cases = [(["strength=0.5"], "needs both"), ([f"init_image={big_label_map['real']}"], "needs both"),
             ([f"init_image={big_label_map['other']}", "strength=0.5"], "not on the grid"),
             (["strength=1.5"], "strength=1.5"), (["window=[5,8,4]"], "multiple of 2"),
             (["window_overlap=1.0"], "window_overlap"), (["window_batch=0"], "window_batch"),
             # beyond what one batch of 4 windows needs, but room for the volume: a smaller window is advised
             (["memory_limit_gb=0.0012"], r"does not fit.*smaller window, e\.g\. window=\[")]
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            synthesise(compose_cfg, big_label_map, out, *extra)
    assert not out.exists()
