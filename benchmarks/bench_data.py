"""Loading time with and without the preprocessed cache.

    python benchmarks/bench_data.py [--cases 6] [--shape 256 256 96] [--crop 128 128 32]

Writes a CT phantom data set (1x1x2.5 mm, resampled to 1.5x1.5x3 mm) into a temporary folder, then times per
case: decoding + checking + resampling + normalising a .nii.gz (what every epoch would cost without the cache),
writing the cache entry once, and reading a training crop from the memory-mapped cache entry.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset import cache  # noqa: E402
from dataset.crops import draw_centre, sample_crop  # noqa: E402
from dataset.layout import find_cases  # noqa: E402
from dataset.phantoms import write_phantom_dataset  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def _seconds(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 96])
    parser.add_argument("--crop", type=int, nargs=3, default=[128, 128, 32])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        root = Path(tmp) / "data"
        write_phantom_dataset(root, n_cases=args.cases, shape=args.shape, spacing=(1.0, 1.0, 2.5), label_nc=4,
                              modality="ct")
        cfg = OmegaConf.create({
            "name": "bench", "modality": "ct", "root_dir": str(root), "layout": "images_labels",
            "image_channel": 0, "label_nc": 4, "patient_id_pattern": "^(.*)$", "spacing": [1.5, 1.5, 3.0],
            "intensity": {"kind": "ct_window", "hu_min": -1000.0, "hu_max": 1000.0}, "cache_dir": None})
        cases = find_cases(cfg)
        decode = np.mean([_seconds(lambda c=c: cache.preprocess_case(c, cfg)) for c in cases])
        write = np.mean([_seconds(lambda c=c: cache.load_preprocessed(c, cfg)) for c in cases])
        folders = [cache.entry_folder(c, cfg) for c in cases]

        def cached_crop(folder):
            entry = cache.read_entry(folder)
            centre = draw_centre(entry.foreground, entry.class_locations, foreground_prob=0.5)
            image, label = sample_crop(entry.image, entry.label, args.crop, centre=centre)
            return np.array(image), np.array(label)

        read = np.mean([_seconds(lambda f=f: cached_crop(f), repeat=5) for f in folders])
        shape = cache.read_entry(folders[0]).image.shape
        print(f"{args.cases} cases of {'x'.join(map(str, args.shape))} voxels (model grid "
              f"{'x'.join(map(str, shape))}), crop {'x'.join(map(str, args.crop))}")
        print(f"  no cache: decode + check + resample + normalise   {decode * 1000:8.1f} ms per case and epoch")
        print(f"  cache:    first use (same work + write .npy)      {write * 1000:8.1f} ms per case, once")
        print(f"  cache:    memory-mapped crop                      {read * 1000:8.1f} ms per case and epoch")
        print(f"  speed-up per epoch: {decode / read:.0f}x")


if __name__ == "__main__":
    main()
