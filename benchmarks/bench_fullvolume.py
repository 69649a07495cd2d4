"""Full-volume synthesis: time and peak memory against volume size, windowed vs whole-volume.

    prlimit --as=12000000000 python -m benchmarks.bench_fullvolume --config demo --device cpu
    python -m benchmarks.bench_fullvolume --config paper --device cuda --steps 5

Models are randomly initialised at the sizes of `config/` (`demo`: experiment=demo; `paper`: the paper's UNet and
stage 1, 37 classes), as in `bench_diffusion` (the time and memory of a network do not depend on its weights).
Each case runs in its own child process under the parent's limits; a case that runs out of memory or time is
reported as such. Cases:
- `full`: label maps of a fixed in-plane size (the training crop's) and 64 to 512 slices on the model grid;
  `steps` guided sampler steps (classifier-free guidance 1.5, conditional and null passes batched) with the UNet
  run window by window (the training crop's latent, and twice as deep; 4 windows per network call as
  `ddpm.sample` does by default, and once 1 per call),
  then the tiled stage-1 decoder; and the same volumes through the networks whole (`whole`) for comparison;
- `latent`: the model grid of a whole 512x512x300 CT (0.98 x 0.98 x 3 mm) at the paper's spacing (AutoPET,
  2 x 2 x 3 mm), sampling only, with windows of whole slices and the crop's depth (--ct-crop-window adds the
  crop's own window: hundreds of small windows, slow on a CPU).
Reported: seconds per sampler step (wall clock, and the process's CPU seconds: on a shared machine the
wall clock also counts waiting for other processes), seconds for decoding, the peak memory while synthesising (CPU: peak RSS,
measured from a reset of the kernel's high-water mark; CUDA: peak allocated) and its growth during the run
("work": peak minus what the process held before, i.e. beyond Python, torch and the model). Windowed, the working
memory stays flat as the volume grows; whole, it grows with the volume.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.common import current_rss, peak_rss, reset_peak_rss, run_case_in_child  # noqa: E402

GUIDANCE = 1.5
OVERLAP = 0.25
CT_SHAPE, CT_SPACING, PAPER_SPACING = (512, 512, 300), (0.977, 0.977, 3.0), (2.0, 2.0, 3.0)
GIB = 2**30


# ---------------------------------------------------------------------------------------------------- child
def phantom_label(shape, label_nc: int, seed: int = 0):
    """A body-like label map (uint8): nested ellipsoids of several classes with a few random blobs."""
    import torch

    axes = [torch.linspace(-1, 1, s) for s in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    radius = (x / 0.9) ** 2 + (y / 0.7) ** 2 + (0.3 * z) ** 2
    label = torch.zeros(shape, dtype=torch.uint8)
    for k, r in enumerate((1.0, 0.6, 0.3)):
        label[radius < r] = (k + 1) % label_nc
    gen = torch.Generator().manual_seed(seed)
    for _ in range(8):
        centre = torch.rand(3, generator=gen) * 1.6 - 0.8
        blob = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 < 0.01
        label[blob] = int(torch.randint(1, label_nc, (1,), generator=gen))
    return label[None, None]


def run_child(spec: dict) -> dict:
    import torch

    from benchmarks.bench_diffusion import build
    from benchmarks.common import sync
    from ddpm.latent_diffusion import make_denoiser
    from ddpm.samplers import SamplerSettings, gaussian, run_sampler
    from ddpm.windowed import unet_window_denoiser
    from layers.tiling import decode_tiled

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model, _, label_nc = build(spec["config"], device, [])
    model.eval()
    image = spec["image"]
    latent_shape = model.vqgan.latent_shape(image)
    label = phantom_label(image, label_nc)
    window = spec["window"]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())
    reset_peak_rss()
    before = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before_cuda = torch.cuda.memory_allocated()
    result = {"case": spec["name"], "mode": spec["mode"], "image": image, "latent": list(latent_shape),
              "window": window, "windows_per_call": spec["windows_per_call"], "steps": spec["steps"],
              "threads": spec["threads"]}
    settings = SamplerSettings("ddim", spec["steps"])
    with torch.no_grad(), autocast:
        generator = torch.Generator().manual_seed(0)
        noise = gaussian((1, *latent_shape), generator=generator, device=device)
        if window is None:
            denoiser = make_denoiser(model.ema_unet, label.to(device).long(), GUIDANCE)
            result["windows"] = 1
        else:
            denoiser = unet_window_denoiser(model.ema_unet, label, window=window, overlap=OVERLAP,
                                            guidance_scale=GUIDANCE, windows_per_call=spec["windows_per_call"])
            result["windows"] = len(denoiser.grid)
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        latent = run_sampler(settings, denoiser, noise, model.schedule, generator=generator)
        sync(device)
        result["step_s"] = (time.perf_counter() - start) / spec["steps"]
        result["cpu_s_per_step"] = (time.process_time() - cpu_start) / spec["steps"]
        if spec["mode"] == "full":
            tile = window or latent_shape[1:]
            start = time.perf_counter()
            decoded = decode_tiled(model.decode, latent, label if model.vqgan.is_spade else None,
                                   factor=model.vqgan.downsample, tile=tile, overlap=OVERLAP, out_device="cpu")
            sync(device)
            result["decode_s"] = time.perf_counter() - start
            result["finite"] = bool(torch.isfinite(decoded).all())
    peak = peak_rss()
    result.update(peak_rss_gib=peak / GIB, working_rss_gib=(peak - before) / GIB,
                  latent_mib=math.prod(latent_shape) * 4 / 2**20)
    if device.type == "cuda":
        result.update(cuda_peak_gib=torch.cuda.max_memory_allocated() / GIB,
                      cuda_working_gib=(torch.cuda.max_memory_allocated() - before_cuda) / GIB)
    return result


# --------------------------------------------------------------------------------------------------- parent
def model_settings(config: str) -> tuple[list[int], list[int], int]:
    """(training crop, stage-1 factor, UNet multiple) of a config."""
    from benchmarks.bench_diffusion import compose_configs

    diffusion, vqgan = compose_configs(config, [])
    factor = [int(f) for f in vqgan.model.vqgan.downsample]
    multiple = 2 ** (len(diffusion.model.diffusion.unet.channel_mult) - 1)
    return [int(c) for c in diffusion.dataset.crop_size], factor, multiple


def ct_model_grid(factor, multiple) -> list[int]:
    """The model grid of a 512x512x300 CT at the paper's spacing, padded as `ddpm.sample` pads it."""
    from dataset.geometry import model_grid_shape

    shape = model_grid_shape(__import__("numpy").diag([*CT_SPACING, 1.0]), CT_SHAPE, PAPER_SPACING)
    return [-(-s // (f * multiple)) * f * multiple for s, f in zip(shape, factor)]


def make_specs(args) -> list[dict]:
    crop, factor, multiple = model_settings(args.config)
    window = [c // f for c, f in zip(crop, factor)]
    deep = [window[0], window[1], 2 * window[2]]
    common = {"config": args.config, "device": args.device, "steps": args.steps, "threads": args.threads,
              "windows_per_call": args.window_batch}
    inplane = args.inplane or crop[0]
    specs = []
    for slices in args.slices:
        image = [inplane, inplane, slices]
        for name, w in (("window", window), ("deep window", deep)):
            specs.append({**common, "name": f"full {slices} {name}", "mode": "full", "image": image, "window": w})
        if slices <= args.whole_up_to:
            specs.append({**common, "name": f"full {slices} whole", "mode": "full", "image": image, "window": None})
    largest = [inplane, inplane, max(args.slices)]
    specs.append({**common, "name": "full one window per call", "mode": "full", "image": largest, "window": window,
                  "windows_per_call": 1})
    if not args.no_ct:
        ct = ct_model_grid(factor, multiple)
        slab = [ct[0] // factor[0], ct[1] // factor[1], window[2]]  # whole slices, the crop's depth
        specs.append({**common, "name": "CT latent", "mode": "latent", "image": ct, "window": slab})
        specs.append({**common, "name": "CT latent", "mode": "latent", "image": ct, "window": slab,
                      "windows_per_call": 1})
        if args.ct_crop_window:
            specs.append({**common, "name": "CT latent", "mode": "latent", "image": ct, "window": window})
    return specs


def row(result: dict) -> str:
    shape = "x".join(map(str, result["image"]))
    window = "whole" if result.get("window") is None else "x".join(map(str, result["window"]))
    per_call = "-" if result.get("window") is None else result["windows_per_call"]
    if "error" in result:
        return f"{result['mode']:<6} {shape:>13} {window:>9} {per_call:>8} {result['error']}"
    decode = f"{result['decode_s']:8.1f}" if "decode_s" in result else f"{'-':>8}"
    text = (f"{result['mode']:<6} {shape:>13} {window:>9} {per_call:>8} {result['windows']:>7} {result['step_s']:9.2f} "
            f"{result['cpu_s_per_step']:9.2f} {decode} "
            f"{result['peak_rss_gib']:9.2f} {result['working_rss_gib']:9.2f}")
    if "cuda_peak_gib" in result:
        text += f" {result['cuda_peak_gib']:9.2f} {result['cuda_working_gib']:9.2f}"
    return text


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["paper", "demo"], default="demo")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=1, help="sampler steps per case (time is per step)")
    parser.add_argument("--slices", type=int, nargs="*", default=[64, 128, 256, 512])
    parser.add_argument("--inplane", type=int, default=None, help="in-plane size (default: the crop's)")
    parser.add_argument("--whole-up-to", type=int, default=512,
                        help="also run whole-volume (no window) cases up to this many slices")
    parser.add_argument("--no-ct", action="store_true", help="skip the 512x512x300 CT latent cases")
    parser.add_argument("--ct-crop-window", action="store_true",
                        help="also run the CT with the training crop's window (many small windows: slow on CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window-batch", type=int, default=4, help="windows per network call (ddpm.sample's "
                        "window_batch); one more case runs the largest volume with 1")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per case")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return []
    print(f"full-volume benchmark: config {args.config}, device {args.device}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, guidance {GUIDANCE}, overlap {OVERLAP}",
          flush=True)
    header = (f"{'mode':<6} {'model grid':>13} {'window':>9} {'per call':>8} {'windows':>7} {'s/step':>9} "
              f"{'CPU s':>9} {'decode s':>8} "
              f"{'peak GiB':>9} {'work GiB':>9}")
    print(header + (f" {'CUDA peak':>9} {'CUDA work':>9}" if args.device == "cuda" else ""), flush=True)
    results = []
    for spec in make_specs(args):
        result = run_case_in_child("benchmarks.bench_fullvolume", spec, args.timeout)
        results.append(result)
        print(row(result), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
