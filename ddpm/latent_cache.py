"""Stage-2 training on latents encoded once: a memory-mapped cache of whole-volume stage-1 latents, cropped in
latent space.

Without it every training step re-encodes its image crop through the frozen stage-1 encoder. With it each
training volume is encoded once (whole, tiled when large, on the model grid and on the training device) into
`<cache_dir>/latents/<data set>-<key>/<preprocessed entry>/latent.npy`, and a training item is a latent crop
whose origin lies on the down-sampling grid, with the label map cropped at the matching image-voxel origin.

The key covers the stage-1 weights (a digest of the frozen VQ-GAN's state dict, not the file name), the
preprocessing settings and the encoding tile; the entry folder name covers the source files. Another checkpoint
or other settings give another folder, so a stale latent is never read.

Image-space augmentations (`dataset.augment`: flips, affine resampling, gamma) cannot be applied to a latent
(the encoder is not equivariant to them): when any is on, stage 2 keeps the on-the-fly path that encodes each
augmented crop. Validation always encodes its centre crops on the fly (a few volumes per validation).

Volumes are encoded in tiles of the training crop blended as at sampling time (`layers.tiling.encode_tiled`,
overlap 0.25), so the cached latent is exactly the latent `init_image` and inpainting start from. The encoder
normalises with GroupNorm statistics over its input and sees a few voxels past each side, so a latent crop that
straddles tiles is close to, not equal to, the encoding of the matching image crop (tests/test_latent_cache.py
states the bound).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset import cache
from dataset.crops import IMAGE_PAD_VALUE, LABEL_PAD_VALUE
from dataset.datamodule import CropCentres
from dataset.layout import as_config
from layers.tiling import encode_tiled
from utils.atomic import atomic_folder
from utils.paths import cache_dir

log = logging.getLogger(__name__)

LATENT_CACHE_VERSION = 1
TILE_OVERLAP = 0.25


def augmentation_active(augment_cfg: Mapping) -> bool:
    """True when `dataset.augment` changes crops in image space (then latents cannot be cached)."""
    return bool(list(augment_cfg["flip_axes"])) or float(augment_cfg["affine_prob"]) > 0 \
        or float(augment_cfg["gamma_prob"]) > 0


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's state dict (parameters and buffers)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def volume_pads(shape: Sequence[int], crop_size: Sequence[int], factor: Sequence[int]) -> list[list[int]]:
    """Padding (before, after) per axis that makes a volume at least one crop (symmetric, as the image-space
    crops pad) and then a multiple of the stage-1 factor (at the end)."""
    pads = []
    for n, s, f in zip(shape, crop_size, factor):
        short = max(0, int(s) - int(n))
        before, after = short // 2, short - short // 2
        after += (-(int(n) + short)) % int(f)
        pads.append([before, after])
    return pads


def padded_crop(array: np.ndarray, pads: Sequence[Sequence[int]], start: Sequence[int], size: Sequence[int],
                value) -> np.ndarray:
    """`crop(pad(array, pads, value), start, size)` without padding the whole (memory-mapped) volume."""
    out = np.full([int(s) for s in size], value, dtype=array.dtype)
    src, dst = [], []
    for n, (before, _), b, s in zip(array.shape, pads, start, size):
        lo, hi = int(b) - before, int(b) - before + int(s)  # crop window in the array's own coordinates
        src.append(slice(max(lo, 0), min(hi, n)))
        dst.append(slice(max(lo, 0) - lo, min(hi, n) - lo))
    if all(d.stop > d.start for d in dst):
        out[tuple(dst)] = array[tuple(src)]
    return out


class LatentCache:
    """The latent folder of one (stage-1 weights, data settings, tile) combination."""

    def __init__(self, dataset_cfg: Mapping, vqgan: torch.nn.Module, *, crop_size: Sequence[int],
                 factor: Sequence[int]):
        cfg = as_config(dataset_cfg)
        self.cfg = cfg
        self.crop_size = [int(s) for s in crop_size]
        self.factor = [int(f) for f in factor]
        # Tiles of the training crop, blended as at sampling time: the cached latent is what `init_image` and
        # inpainting encode (ddpm.synthesis), and a crop on a tile has the statistics of a crop's own encoding.
        self.tile = [s // f for s, f in zip(self.crop_size, self.factor)]
        key_source = {"version": LATENT_CACHE_VERSION, "weights": weights_digest(vqgan),
                      "preprocessing": cache.settings_hash(cfg), "crop_size": self.crop_size, "tile": self.tile,
                      "overlap": TILE_OVERLAP}
        self.key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:16]
        self.root = cache_dir(cfg.get("cache_dir")) / "latents" / f"{cfg.name}-{self.key}"

    def folder(self, entry: Path) -> Path:
        return self.root / Path(entry).name

    def has(self, entry: Path) -> bool:
        return (self.folder(entry) / "meta.json").is_file()

    @torch.no_grad()
    def build(self, entries: Sequence[Path], encode, device: torch.device | str) -> int:
        """Encode every preprocessed entry that has no latent yet (`encode(image) -> unscaled latent`);
        returns how many were encoded."""
        missing = [e for e in entries if not self.has(e)]
        for i, entry in enumerate(missing):
            case = cache.read_entry(entry)
            pads = volume_pads(case.image.shape, self.crop_size, self.factor)
            image = np.pad(np.asarray(case.image, dtype=np.float32), pads, constant_values=IMAGE_PAD_VALUE)
            latent = encode_tiled(encode, torch.from_numpy(image)[None, None], factor=self.factor,
                                  tile=self.tile, overlap=TILE_OVERLAP, device=device, out_device="cpu")
            self._write(entry, latent[0].float().numpy(), pads)
            log.info("latent cache: encoded %s (%d/%d)", case.case_id, i + 1, len(missing))
        return len(missing)

    def _write(self, entry: Path, latent: np.ndarray, pads: list[list[int]]) -> None:
        with atomic_folder(self.folder(entry)) as tmp:
            np.save(tmp / "latent.npy", latent)
            (tmp / "meta.json").write_text(json.dumps({"pads": pads, "latent_shape": list(latent.shape),
                                                       "key": self.key}))

    def read(self, entry: Path) -> tuple[np.ndarray, list[list[int]]]:
        folder = self.folder(entry)
        meta = json.loads((folder / "meta.json").read_text())
        return np.load(folder / "latent.npy", mmap_mode="r"), meta["pads"]


class LatentCropDataset(Dataset):
    """Random latent crops of `crop_size` image voxels (origin on the stage-1 grid), with the label map cropped
    to match; centred as the image-space crops are (`dataset.datamodule.CropCentres`)."""

    def __init__(self, latent_cache: LatentCache, entries: Sequence[Path], *, centres: CropCentres):
        self.cache = latent_cache
        self.entries = list(entries)
        self.centres = centres
        self.latent_size = [s // f for s, f in zip(latent_cache.crop_size, latent_cache.factor)]

    def __len__(self) -> int:
        return len(self.entries)

    def latent_start(self, latent_shape: Sequence[int], pads, voxel: np.ndarray | None,
                     generator: torch.Generator | None = None) -> list[int]:
        """Latent crop origin around `voxel` (of the unpadded volume), or uniform when None."""
        size = self.latent_size
        if voxel is not None:
            centre = [(int(v) + before) / f for v, (before, _), f in zip(voxel, pads, self.cache.factor)]
            return [int(min(max(round(c - s / 2), 0), n - s)) for c, s, n in zip(centre, size, latent_shape)]
        return [int(torch.randint(0, n - s + 1, (1,), generator=generator)) for n, s in zip(latent_shape, size)]

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        case = cache.read_entry(entry)
        latent, pads = self.cache.read(entry)
        start = self.latent_start(latent.shape[1:], pads, self.centres.draw(case))
        window = (slice(None), *(slice(b, b + s) for b, s in zip(start, self.latent_size)))
        label = padded_crop(case.label, pads, [b * f for b, f in zip(start, self.cache.factor)],
                            self.cache.crop_size, LABEL_PAD_VALUE)
        return {"latent": torch.from_numpy(np.array(latent[window], dtype=np.float32)),
                "label": torch.from_numpy(label.astype(np.int64))[None], "case_id": case.case_id}


def attach_latent_cache(datamodule, vqgan: torch.nn.Module, *, device: torch.device | str, factor: Sequence[int],
                        build: bool, barrier=None) -> LatentCropDataset | None:
    """Swap the data module's training crops for latent crops (building missing latents first, on `device`).

    `build` is true on the one process per node that encodes (local rank zero); the others wait at `barrier`
    and then read. Returns the new training set, or None (with a log line saying why) when image-space
    augmentations are on."""
    cfg = datamodule.cfg
    if augmentation_active(cfg.augment):
        log.info("latent cache off: dataset.augment acts in image space, crops are encoded on the fly")
        return None
    entries = list(datamodule.train_set.entries)
    latent_cache = LatentCache(cfg, vqgan, crop_size=cfg.crop_size, factor=factor)
    if build:
        n = latent_cache.build(entries, vqgan.encode, device)
        log.info("latent cache %s: %d of %d training volumes encoded now", latent_cache.root, n, len(entries))
    if barrier is not None:
        barrier()
    datamodule.train_set = LatentCropDataset(latent_cache, entries, centres=datamodule.train_set.centres)
    return datamodule.train_set

