"""The diversity controls of `ddpm.sample`, measured: for each setting, several samples of the same label map
(seeds 0..n-1, as `n_per_label` draws them) and the evaluation's diversity metric, the mean pairwise MS-SSIM
between them (`evaluation.metrics.ms_ssim3d`, data range 2 on the normalised model grid; lower = more diverse),
with the mean absolute difference to the real scan of that label map beside it (what diversity is traded for).

    python -m benchmarks.bench_diversity --ckpt runs/diffusion-demo/last.ckpt
    python -m benchmarks.bench_diversity --ckpt DIFF.ckpt --image IMG.nii.gz --labels LAB.nii.gz --samples 4

Settings: DDIM with eta 0 (deterministic given the seed) and 1 (as noisy as ancestral sampling), classifier-free
guidance 1 (conditional model), 2 and 4, and partial-noise starts from the real scan (`init_image`) at strength
0.7 and 0.4. Without --image/--labels the label maps are held-out demo cases (as for the counterfactual figure).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from utils.errors import UserError, exit_on_user_error  # noqa: E402

SETTINGS = [  # name, eta, guidance scale, strength (< 1: from the real scan)
    ("ddim eta 0 (reference)", 0.0, 1.0, 1.0),
    ("ddim eta 1", 1.0, 1.0, 1.0),
    ("guidance 2", 0.0, 2.0, 1.0),
    ("guidance 4", 0.0, 4.0, 1.0),
    ("init_image strength 0.7", 0.0, 1.0, 0.7),
    ("init_image strength 0.4", 0.0, 1.0, 0.4),
]


def mean_pairwise_ms_ssim(volumes: list[np.ndarray]) -> float:
    from evaluation.metrics import ms_ssim3d

    pairs = itertools.combinations(volumes, 2)
    return float(np.mean([ms_ssim3d(a, b, data_range=2.0, low=-1.0) for a, b in pairs]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--labels", type=Path, default=None)
    parser.add_argument("--cases", type=int, default=1, help="held-out demo cases (without --image)")
    parser.add_argument("--samples", type=int, default=3, help="samples per label map and setting")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.ckpt.is_file():
        raise UserError(f"{args.ckpt}: checkpoint not found; train the demo first (bash demo.sh) or pass --ckpt")
    if (args.image is None) != (args.labels is None):
        raise UserError("--image and --labels go together (or give neither for demo cases)")
    if args.samples < 2:
        raise UserError(f"--samples {args.samples}: diversity needs at least 2 samples")
    return args


def measure_case(synth, image_path: Path, label_path: Path, case: str, rows: dict, args) -> None:
    """Every setting's samples of one label map: their pairwise MS-SSIM, distance to the real scan, seconds."""
    import torch

    from dataset.crops import unpad
    from dataset.io import load_nifti
    from ddpm.sample import output_seed
    from ddpm.samplers import SamplerSettings

    labels, affine = load_nifti(label_path)
    image, image_affine = load_nifti(image_path)
    prepared = synth.prepare(labels, affine, str(label_path))
    init = synth.prepare_init(image, image_affine, str(image_path), prepared)
    real = unpad(init, prepared.pads)
    for name, eta, guidance, strength in SETTINGS:
        samples = []
        for k in range(args.samples):
            started = time.perf_counter()
            samples.append(synth.sample(prepared, settings=SamplerSettings("ddim", args.steps, eta),
                                        guidance_scale=guidance,
                                        generator=torch.Generator().manual_seed(output_seed(0, k)),
                                        init=init if strength < 1 else None, strength=strength))
            rows[name]["seconds_per_sample"].append(time.perf_counter() - started)
        rows[name]["ms_ssim"].append(mean_pairwise_ms_ssim(samples))
        rows[name]["mae_to_real"].append(float(np.mean([np.abs(s - real).mean() for s in samples])))
        print(f"{case}: {name}: pairwise MS-SSIM {rows[name]['ms_ssim'][-1]:.3f}, |sample - real| "
              f"{rows[name]['mae_to_real'][-1]:.3f}", flush=True)


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from benchmarks.make_counterfactual_figure import demo_cases
    from ddpm.checkpoint import load_diffusion
    from ddpm.synthesis import Synthesizer
    from utils.device import resolve_device

    cases = [(args.image, args.labels, args.image.name)] if args.image else demo_cases(args.ckpt, args.cases)
    device = resolve_device(args.device)
    model, meta = load_diffusion(args.ckpt, map_location=device)
    synth = Synthesizer(model, meta, device, windows_per_call=4)
    rows = {name: {"setting": name, "eta": eta, "guidance_scale": g, "strength": s, "ms_ssim": [], "mae_to_real": [],
                   "seconds_per_sample": []} for name, eta, g, s in SETTINGS}
    for image_path, label_path, case in cases:
        measure_case(synth, image_path, label_path, case, rows, args)
    results = []
    print(f"\n{'setting':<26} {'MS-SSIM (lower = more diverse)':>31} {'|sample - real|':>16} {'s/sample':>9}")
    for row in rows.values():
        summary = {**row, "ms_ssim": float(np.mean(row["ms_ssim"])), "mae_to_real": float(np.mean(row["mae_to_real"])),
                   "seconds_per_sample": float(np.mean(row["seconds_per_sample"])), "cases": len(cases),
                   "samples": args.samples, "steps": args.steps}
        results.append(summary)
        print(f"{row['setting']:<26} {summary['ms_ssim']:>31.3f} {summary['mae_to_real']:>16.3f} "
              f"{summary['seconds_per_sample']:>9.1f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
