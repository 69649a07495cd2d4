"""Stage-1 training and inference speed and memory.

    prlimit --as=8000000000 python -m benchmarks.bench_vqgan --config paper --device cpu --steps 5 --crop 64 64 32
    python -m benchmarks.bench_vqgan --config demo --device cuda --steps 20

Runs full training iterations (generator step + discriminator step, GAN losses on from the first step) of the
model settings of `config/model/vqgan.yaml` (`paper`) or of `experiment=demo` (`demo`), with the same step
functions the LightningModule uses, and prints per-iteration generator and discriminator time (median after one
warm-up iteration), voxels per second, peak memory (process peak RSS; CUDA peak allocated), and the time to encode
and decode one volume. On CPU at the paper settings with a 64x64x32 crop it also prints the ratio to the
published Med-LSDM code measured side by side on a 2-core CPU (7.45 s per iteration, 2.13 GiB peak RSS).

`--config paper_widths` uses `model=vqgan_paper` (config/model/vqgan_paper.yaml: the published code's widths and
parameter counts); with `--perceptual vgg16` the whole stage 1 then has the published capacity. Parameter counts
of the autoencoder, the discriminators and the perceptual network are in the JSON.

`--quantizer ema_vq|fsq|kl` picks the stage-1 latent kind (default: the config's, ema_vq); run one process per
kind, since the peak memory is the process's.

`--perceptual vgg16` swaps the perceptual backbone for a VGG16-shaped TorchScript network with random weights
(same cost as the VGG-based LPIPS of the published code; the real weights cannot be downloaded here).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.common import peak_rss_gib, sync  # noqa: E402
from layers.memory_format import to_channels_last_3d  # noqa: E402
from utils.build import build  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.errors import exit_on_user_error  # noqa: E402
from utils.paths import CONFIG_DIR  # noqa: E402
from vq_gan_3d.training import StageTimer, training_iteration  # noqa: E402

# Published Med-LSDM VQ-GAN, paper model settings, 64x64x32 crop, batch 2, measured side by side with ours in one
# run on a 2-core CPU (issue 15).
BASELINE = {"crop": [64, 64, 32], "batch": 2, "iteration_s": 7.45, "peak_rss_gib": 2.13}
PAPER_CROP = [256, 256, 32]
PAPER_CONFIGS = {"paper": [], "paper_widths": ["model=vqgan_paper"]}  # overrides: our model, the published widths


def compose_config(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    preset = PAPER_CONFIGS.get(name, ["experiment=demo"])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="vqgan", overrides=preset + ["model.loss.gan_start_step=0", *overrides])


class VGG16Features(nn.Module):
    """The convolutional part of VGG16, returning the five LPIPS taps (relu1_2 ... relu5_3)."""

    def __init__(self):
        super().__init__()
        widths = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
        stages, in_ch = [], 3
        for i, stage in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i else []
            for out_ch in stage:
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU()]
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


def params_m(module: nn.Module | None) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6 if module is not None else 0.0


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*PAPER_CONFIGS, "demo"], default="paper")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed iterations after one warm-up iteration")
    parser.add_argument("--crop", type=int, nargs=3, default=None,
                        help="X Y Z (default: 256 256 32 for paper, the demo data set's crop for demo)")
    parser.add_argument("--batch", type=int, default=None, help="default: the data set's batch size")
    parser.add_argument("--perceptual", choices=["config", "vgg16", "none"], default="config")
    parser.add_argument("--quantizer", choices=["ema_vq", "fsq", "kl"], default=None,
                        help="stage-1 latent kind (default: the config's)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: PyTorch's default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra Hydra overrides, e.g. model.channels_last=false")
    return parser.parse_args(argv)


def benchmark_config(args: argparse.Namespace, workdir: Path):
    """The composed config of the run: preset, quantizer, perceptual backbone (a random VGG16 written to
    `workdir` for `vgg16`) and the extra overrides."""
    overrides = list(args.override) + ([f"model.vqgan.quantizer={args.quantizer}"] if args.quantizer else [])
    if args.perceptual == "vgg16":
        path = workdir / "vgg16_features.pt"
        torch.jit.save(torch.jit.script(VGG16Features().eval()), str(path))
        overrides += ["model.loss.perceptual_backbone=torchscript", f"model.loss.perceptual_path={path}"]
    elif args.perceptual == "none":
        overrides += ["model.loss.perceptual_weight=0"]
    return compose_config(args.config, overrides)


def build_models(m, device: torch.device, compile_networks: bool):
    """Stage 1, its loss (discriminators, perceptual network) and both optimisers, as training builds them."""
    torch.manual_seed(0)
    vqgan = build(m.vqgan, "model.vqgan").to(device)
    loss = build(m.loss, "model.loss").to(device)
    if m.channels_last:
        to_channels_last_3d(vqgan)
        to_channels_last_3d(loss)
    if compile_networks:
        vqgan.encoder = torch.compile(vqgan.encoder)
        vqgan.decoder = torch.compile(vqgan.decoder)
    betas = tuple(float(b) for b in m.betas)
    opt_g = torch.optim.Adam(vqgan.parameters(), lr=float(m.lr), betas=betas)
    disc_params = [p for d in loss.discriminators() for p in d.parameters()]
    opt_d = torch.optim.Adam(disc_params, lr=float(m.disc_lr), betas=betas) if disc_params else None
    return vqgan, loss, opt_g, opt_d


def time_training(models, image, label, m, steps: int, device: torch.device, autocast):
    """Per timed iteration (after one warm-up): generator seconds, discriminator seconds, process CPU seconds."""
    vqgan, loss, opt_g, opt_d = models
    g_times, d_times, cpu_times = [], [], []
    for step in range(steps + 1):
        timer = StageTimer(device)
        cpu0 = time.process_time()
        with autocast:
            training_iteration(vqgan=vqgan, loss=loss, opt_g=opt_g, opt_d=opt_d, image=image, label=label,
                               step=step, generator=torch.Generator().manual_seed(step), grad_clip=float(m.grad_clip),
                               timer=timer)
        g_s, d_s = timer.seconds.get("generator", 0.0), timer.seconds.get("discriminator", 0.0)
        if step > 0:  # the first iteration pays one-off costs (allocations, kernel selection, codebook init)
            g_times.append(g_s)
            d_times.append(d_s)
            cpu_times.append(time.process_time() - cpu0)
        print(f"iteration {step}{' (warm-up)' if step == 0 else ''}: generator {g_s:.3f} s, "
              f"discriminator {d_s:.3f} s, CPU time {time.process_time() - cpu0:.2f} s", flush=True)
    return g_times, d_times, cpu_times


@torch.no_grad()
def time_codec(vqgan, image, label, device: torch.device, autocast, repeats: int = 3) -> tuple[float, float]:
    """Fastest of `repeats` encodes and decodes of one volume (seconds)."""
    vqgan.eval()
    enc_times, dec_times = [], []
    with autocast:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            z = vqgan.encode(image)
            sync(device)
            t1 = time.perf_counter()
            vqgan.decode(z, label if vqgan.is_spade else None)
            sync(device)
            enc_times.append(t1 - t0)
            dec_times.append(time.perf_counter() - t1)
    return min(enc_times), min(dec_times)


def print_report(result: dict) -> None:
    g, d = result["generator_s"], result["discriminator_s"]
    print(f"per iteration: generator {g:.3f} s + discriminator {d:.3f} s = {g + d:.3f} s; "
          f"{result['voxels_per_s']:.0f} voxels/s; peak RSS {result['peak_rss_gib']:.2f} GiB"
          + (f"; CUDA peak {result['cuda_peak_allocated_gib']:.2f} GiB" if "cuda_peak_allocated_gib" in result else ""))
    print(f"one volume {result['crop']}: encode {result['encode_one_volume_s']:.3f} s, "
          f"decode {result['decode_one_volume_s']:.3f} s")
    if "speedup_vs_published" in result:
        print(f"vs published code (7.45 s, 2.13 GiB): {result['speedup_vs_published']:.2f}x faster, "
              f"{result['peak_rss_fraction_of_published']:.2f}x the peak memory")
    print(json.dumps(result))


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        cfg = benchmark_config(args, Path(workdir))
        paper = args.config in PAPER_CONFIGS
        crop = list(args.crop) if args.crop else (PAPER_CROP if paper else list(cfg.dataset.crop_size))
        batch = args.batch or int(cfg.dataset.batch_size)
        m = cfg.model
        models = build_models(m, device, args.compile)
        vqgan, loss = models[:2]

        gen = torch.Generator().manual_seed(0)
        image = (torch.rand(batch, 1, *crop, generator=gen) * 2 - 1).to(device)
        label = torch.randint(0, int(cfg.dataset.label_nc), (batch, 1, *crop), generator=gen).to(device)
        if m.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats()
        g_times, d_times, cpu_times = time_training(models, image, label, m, args.steps, device, autocast)
        encode_s, decode_s = time_codec(vqgan, image[:1], label[:1], device, autocast)

    g, d = median(g_times), median(d_times)
    result = {
        "config": args.config, "quantizer": str(m.vqgan.quantizer), "device": args.device,
        "threads": torch.get_num_threads(), "crop": crop, "batch": batch,
        "perceptual": args.perceptual if args.perceptual != "config" else str(m.loss.perceptual_backbone),
        "channels_last": bool(m.channels_last), "gradient_checkpointing": bool(m.vqgan.gradient_checkpointing),
        "slices_per_volume": int(m.loss.slices_per_volume), "compile": args.compile,
        "autoencoder_params_m": params_m(vqgan), "disc_2d_params_m": params_m(loss.disc_2d),
        "disc_3d_params_m": params_m(loss.disc_3d), "perceptual_params_m": params_m(loss.perceptual),

        "generator_s": g, "discriminator_s": d, "iteration_s": g + d, "voxels_per_s": batch * math.prod(crop) / (g + d),
        "encode_one_volume_s": encode_s, "decode_one_volume_s": decode_s,
        "peak_rss_gib": peak_rss_gib(),
        # CPU seconds of this process per iteration (all threads): less sensitive than wall time to other
        # processes sharing the cores; about threads x wall time on an idle machine.
        "cpu_s_per_iteration": median(cpu_times),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
    if paper and device.type == "cpu" and crop == BASELINE["crop"] and batch == BASELINE["batch"]:
        result["speedup_vs_published"] = BASELINE["iteration_s"] / result["iteration_s"]
        result["peak_rss_fraction_of_published"] = result["peak_rss_gib"] / BASELINE["peak_rss_gib"]
    print_report(result)
    return result


if __name__ == "__main__":
    main()
