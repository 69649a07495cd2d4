"""Stage-2 training-step and synthesis speed and memory, with ratios to the published Med-LSDM code.

    prlimit --as=8000000000 python -m benchmarks.bench_diffusion --config paper --device cpu
    python -m benchmarks.bench_diffusion --config demo --device cuda

`paper`: the model settings of `config/model/diffusion.yaml` with the published code's 37 label classes and 500
timesteps, the paper's stage 1 (`config/model/vqgan.yaml`). `demo`: the settings of `experiment=demo`.
`--block resnet` builds the UNet from the published code's residual blocks (`model.diffusion.unet.block=resnet`: 39.7M
parameters at the paper settings, the published 37.9M; the default block has 14.8M).

Every case runs in its own child process, so each peak memory is that case's alone (CPU: the process's peak RSS,
torch and the resident models included; CUDA: peak allocated). The model is resident as in training (stage 1,
UNet, EMA copy). Cases:
- training step (forward, backward, AdamW, EMA update) on stage-1 latents with the label map at image resolution:
  the published code's small setting (8x16x16 latent of a 64x64x32 crop, batch 2), the paper crop (8x64x64 latent
  of 256x256x32) at batch 1 (published: 15.6 s) and batch 2;
- synthesis of one volume from its label map, decoding included, per sampler and step count, with classifier-free
  guidance (scale 1.5: conditional and null passes in one batch) as the published code sampled.

Published code, measured side by side with ours in one run on a 2-core CPU (issue 15; SPADE UNet 64 ch x
(1,2,4,8), 37 classes, 64-channel mask compressor, 500 timesteps): training step 1.26 s / 1.58 GiB (8x16x16,
batch 2) and 15.6 s / 4.74 GiB (8x64x64, batch 1); one guided step 0.644 s on 8x16x16, 500 steps per volume
(322 s before decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.common import peak_rss_gib, run_case_in_child, sync  # noqa: E402

BASELINE = {
    "train_small": {"step_s": 1.26, "peak_gib": 1.58},
    "train_large_b1": {"step_s": 15.6, "peak_gib": 4.74},
    "guided_step_s": 0.644, "steps": 500,
}
TRAIN_CASES = {"train_small": ([64, 64, 32], 2), "train_large_b1": ([256, 256, 32], 1),
               "train_large_b2": ([256, 256, 32], 2)}
SAMPLE_CASES = [([64, 64, 32], "dpmpp_2m", 10), ([64, 64, 32], "dpmpp_2m", 20), ([64, 64, 32], "ddim", 50),
                ([256, 256, 32], "dpmpp_2m", 20)]
GUIDANCE = 1.5


# ---------------------------------------------------------------------------------------------------- child
def compose_configs(config: str, overrides: list[str], vqgan_overrides: list[str] = ()):
    from hydra import compose, initialize_config_dir

    from utils.paths import CONFIG_DIR

    experiment = ["experiment=demo"] if config == "demo" else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        diffusion = compose(config_name="diffusion",
                            overrides=experiment + ["model.vqgan_ckpt=unused", *overrides])
        vqgan = compose(config_name="vqgan", overrides=experiment + list(vqgan_overrides))
    return diffusion, vqgan


def build(config: str, device, overrides: list[str], vqgan_overrides: list[str] = ()):
    import torch

    from utils.build import build as build_node

    diffusion_cfg, vqgan_cfg = compose_configs(config, overrides, vqgan_overrides)
    label_nc = 37 if config == "paper" else int(diffusion_cfg.dataset.label_nc)
    timesteps = 500 if config == "paper" else int(diffusion_cfg.model.diffusion.timesteps)
    diffusion_cfg.model.diffusion.timesteps = timesteps
    torch.manual_seed(0)
    vqgan = build_node(vqgan_cfg.model.vqgan, "model.vqgan")
    model = build_node(diffusion_cfg.model.diffusion, "model.diffusion", vqgan=vqgan, label_nc=label_nc).to(device)
    model.scale_factor.fill_(1.0)
    return model, diffusion_cfg, label_nc


def peak_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_gib()


def time_training(model, label, latent_shape, spec: dict, device, autocast, gen) -> dict:
    """Median time of a training step (forward, backward, AdamW, EMA) after one warm-up step, the peak memory,
    then the stage-1 encoding of the batch timed on its own (after the peak was read)."""
    import torch

    from ddpm.latent_diffusion import denoising_loss, make_optimizer

    batch, image_shape = spec["batch"], spec["image"]
    model.train()
    x0 = torch.randn(batch, *latent_shape, generator=gen).to(device)
    optimizer = make_optimizer(model.unet, lr=1e-4, weight_decay=0.0)
    times, cpu = [], []
    for step in range(spec["steps"] + 1):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            loss = denoising_loss(model.unet, model.schedule, x0, label, loss=model.loss_kind,
                                  cond_drop_prob=model.cond_drop_prob, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_ema(step)
        sync(device)
        if step > 0:  # the first step pays one-off costs
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    result = dict(step_s=statistics.median(times), cpu_s_per_step=statistics.median(cpu), peak_gib=peak_gib(device))
    with torch.no_grad(), autocast:
        image = torch.rand(batch, 1, *image_shape, generator=gen).to(device) * 2 - 1
        sync(device)
        t0 = time.perf_counter()
        model.encode(image)
        sync(device)
        result["encode_batch_s"] = time.perf_counter() - t0
    return result


def time_synthesis(model, label, spec: dict, device, autocast, built_gib: float) -> dict:
    """One guided synthesis (sampling, then decoding) of the label map, after a warm-up run if `spec["warmup"]`,
    with what `ddpm.sample` would estimate for it (it refuses volumes whose estimate exceeds free memory)."""
    import torch

    from ddpm.samplers import SamplerSettings
    from ddpm.synthesis import estimate_bytes

    model.eval()
    settings = SamplerSettings(spec["sampler"], spec["steps"])
    with torch.no_grad(), autocast:
        runs = []
        for _ in range(2 if spec["warmup"] else 1):
            sync(device)
            t0 = time.perf_counter()
            latent = model.sample_latent(label, settings=settings, guidance_scale=GUIDANCE,
                                         generator=torch.Generator().manual_seed(0))
            sync(device)
            t1 = time.perf_counter()
            model.decode(latent, label)
            sync(device)
            runs.append((t1 - t0, time.perf_counter() - t1))
    sample_s, decode_s = runs[-1]
    return dict(estimated_gib=built_gib + estimate_bytes(model, spec["image"], GUIDANCE) / 2**30,
                sampler=spec["sampler"], steps=spec["steps"], guidance_scale=GUIDANCE, sample_s=sample_s,
                decode_s=decode_s, volume_s=sample_s + decode_s, guided_step_s=sample_s / spec["steps"])


def run_child(spec: dict) -> dict:
    import torch

    from vq_gan_3d.training import set_malloc_mmap_threshold

    set_malloc_mmap_threshold()  # as the training and sampling entry points do
    device = torch.device(spec["device"])
    imported_gib = peak_gib(device) if device.type == "cpu" else 0.0
    model, cfg, label_nc = build(spec["config"], device, spec["overrides"], spec["vqgan_overrides"])
    built_gib = peak_gib(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, label_nc, (spec["batch"], 1, *spec["image"]), generator=gen).to(device)
    latent_shape = model.vqgan.latent_shape(spec["image"])
    result = {"case": spec["name"], "image": spec["image"], "latent": list(latent_shape), "batch": spec["batch"],
              "unet_params_m": sum(p.numel() for p in model.unet.parameters()) / 1e6,
              "rss_after_import_gib": imported_gib}
    if spec["kind"] == "train":
        result.update(time_training(model, label, latent_shape, spec, device, autocast, gen))
    else:
        result.update(time_synthesis(model, label, spec, device, autocast, built_gib))
    result.setdefault("peak_gib", peak_gib(device))
    return result


# --------------------------------------------------------------------------------------------------- parent
def with_ratios(result: dict) -> dict:
    base = BASELINE.get(result["case"])
    if base and "step_s" in result:
        result["speedup_vs_published"] = base["step_s"] / result["step_s"]
        result["memory_fraction_of_published"] = result["peak_gib"] / base["peak_gib"]
    if "volume_s" in result and result["image"] == [64, 64, 32]:
        published = BASELINE["guided_step_s"] * BASELINE["steps"]
        result["speedup_vs_published_500_steps"] = published / result["volume_s"]
        result["step_speedup_vs_published"] = BASELINE["guided_step_s"] / result["guided_step_s"]
    return result


def describe(result: dict) -> str:
    if "error" in result:
        return f"{result['case']}: {result['error']}"
    if "step_s" in result:
        text = (f"{result['case']}: latent {result['latent']} batch {result['batch']}: step {result['step_s']:.3f} s "
                f"(CPU {result['cpu_s_per_step']:.2f} s), peak {result['peak_gib']:.2f} GiB, encode batch "
                f"{result['encode_batch_s']:.3f} s")
        if "speedup_vs_published" in result:
            text += (f" | vs published: {result['speedup_vs_published']:.1f}x faster, "
                     f"{result['memory_fraction_of_published']:.2f}x the memory")
        return text
    text = (f"synthesis {result['image']} {result['sampler']} {result['steps']} steps, guidance {GUIDANCE}: "
            f"{result['volume_s']:.2f} s (sampling {result['sample_s']:.2f} s = {result['guided_step_s']:.3f} s/step, "
            f"decode {result['decode_s']:.2f} s), peak {result['peak_gib']:.2f} GiB (ddpm.sample's estimate "
            f"{result['estimated_gib']:.2f} GiB)")
    if "speedup_vs_published_500_steps" in result:
        text += (f" | vs published 500 x 0.644 s: {result['speedup_vs_published_500_steps']:.0f}x faster "
                 f"(per step {result['step_speedup_vs_published']:.1f}x)")
    return text


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["paper", "demo"], default="paper")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up step")
    parser.add_argument("--cases", nargs="*", default=None,
                        help="subset: train_small train_large_b1 train_large_b2 sample")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--block", choices=["default", "resnet"], default=None,
                        help="UNet residual block (model.diffusion.unet.block; default: the config's)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="Hydra overrides of the diffusion config, e.g. model.diffusion.unet.num_res_blocks=1")
    parser.add_argument("--vqgan-override", nargs="*", default=[],
                        help="Hydra overrides of the stage-1 config, e.g. model.vqgan.embedding_dim=8")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return []

    wanted = set(args.cases or [*TRAIN_CASES, "sample"])
    overrides = args.override + ([f"model.diffusion.unet.block={args.block}"] if args.block else [])
    common = {"config": args.config, "device": args.device, "overrides": overrides,
              "vqgan_overrides": args.vqgan_override}
    specs = [{**common, "name": name, "kind": "train", "image": image, "batch": batch, "steps": args.steps}
             for name, (image, batch) in TRAIN_CASES.items() if name in wanted]
    if "sample" in wanted:
        specs += [{**common, "name": f"sample_{sampler}_{steps}_{image[0]}", "kind": "sample", "image": image,
                   "batch": 1, "sampler": sampler, "steps": steps, "warmup": args.device == "cuda"}
                  for image, sampler, steps in SAMPLE_CASES]
    print(f"stage-2 benchmark: config {args.config} {' '.join([*overrides, *args.vqgan_override])}, "
          f"device {args.device}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for spec in specs:
        result = with_ratios(run_case_in_child("benchmarks.bench_diffusion", spec, args.timeout))
        results.append(result)
        print(describe(result), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
