"""Sampling with part of the latent known: RePaint-style inpainting and SDEdit-style partial-noise starts.

`repaint(denoise, x0_known, unknown, ...)` regenerates the voxels where `unknown` is true and keeps the rest
tied to `x0_known` (Lugmayr et al. 2022):
- at every step, before the network sees x_t, the known voxels are replaced by `x0_known` noised to the current
  level t (fresh noise each time), so the generated part is always denoised next to the real context;
- `resample` times per step the result x_s is noised back to t (x_t = sqrt(a_t/a_s) x_s + sqrt(1 - a_t/a_s) z)
  and denoised again, which lets the generated part and the context agree at the boundary;
- `strength` < 1 starts from `x0_known` noised to an intermediate level (Meng et al. 2022, SDEdit): only the grid
  steps below `strength * T` run, so the unknown part keeps some of the original (gentler edits);
- the result is `x0_known` exactly outside `unknown`.
The loop is over the `step` of a `ddpm.samplers` scheduler (DDPM or DDIM: one-step samplers, since a resampled
step is visited several times) and the schedule's `q_sample`; with `unknown` all true, `resample=0` it is the
plain sampler (`strength` < 1: started from `partial_start`).
"""
from __future__ import annotations

import torch

from ddpm.samplers import Denoiser, SamplerSettings, StepCallback, gaussian_like, make_scheduler
from ddpm.schedule import DiffusionSchedule

REPAINT_SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def repaint(denoise: Denoiser, x0_known: torch.Tensor, unknown: torch.Tensor, schedule: DiffusionSchedule, *,
            sampler: str = "ddim", steps: int = 50, eta: float = 0.0, strength: float = 1.0, resample: int = 0,
            generator: torch.Generator | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """x0 equal to `x0_known` where `unknown` is false and generated where it is true (`unknown` broadcasts
    against the latent, e.g. (B or 1, 1, X, Y, Z) booleans). `callback(i, t, x_s, x0_pred)` after every grid
    step (not after every resampling)."""
    if sampler not in REPAINT_SAMPLERS:
        raise ValueError(f"inpainting and partial-noise starts need one of {REPAINT_SAMPLERS} (a one-step "
                         f"sampler), got {sampler!r}")
    if resample < 0:
        raise ValueError(f"resample must be >= 0, got {resample}")
    scheduler = make_scheduler(SamplerSettings(sampler, steps, eta), schedule, strength)
    unknown = unknown.to(x0_known.device).bool()
    everything = bool(unknown.all())  # nothing known: skip the replacement (and its noise draws)
    x = gaussian_like(x0_known, generator)
    if strength < 1.0:
        x = schedule.q_sample(x0_known, scheduler.timesteps[0], x)
    for i, t in enumerate(scheduler.timesteps):
        s = scheduler.next_timestep(t)
        for r in range(resample + 1):
            if not everything:
                x = torch.where(unknown, x, schedule.q_sample(x0_known, t, gaussian_like(x0_known, generator)))
            x = scheduler.step(denoise(x, t), t, x, generator)
            if r < resample:
                x = schedule.q_sample(x, t, gaussian_like(x, generator), s=s)  # back to level t
        if callback is not None:
            callback(i, t, x, scheduler.x0_pred)
    return torch.where(unknown, x, x0_known)
