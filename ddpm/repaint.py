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
With `unknown` all true, `resample=0` and `strength=1` this is the plain DDPM/DDIM sampler of `ddpm.samplers`.
"""
from __future__ import annotations

import torch

from ddpm.samplers import Denoiser, StepCallback, ddim_update, ddpm_update, gaussian, partial_grid
from ddpm.schedule import DiffusionSchedule

REPAINT_SAMPLERS = ("ddpm", "ddim")


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return gaussian(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _scalar(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype)


def renoise(schedule: DiffusionSchedule, x_s: torch.Tensor, s: int, t: int,
            generator: torch.Generator | None) -> torch.Tensor:
    """A draw of x_t given x_s (t > s) under the forward process."""
    ratio = schedule.alpha_bar_at(t) / schedule.alpha_bar_at(s)
    return _scalar(ratio.sqrt(), x_s) * x_s + _scalar((1 - ratio).sqrt(), x_s) * _noise(x_s, generator)


def noised(schedule: DiffusionSchedule, x0: torch.Tensor, t: int, generator: torch.Generator | None
           ) -> torch.Tensor:
    a = schedule.alpha_bar_at(t)
    return _scalar(a.sqrt(), x0) * x0 + _scalar((1 - a).sqrt(), x0) * _noise(x0, generator)


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
    grid = partial_grid(schedule.timesteps, steps, strength)
    unknown = unknown.to(x0_known.device).bool()
    everything = bool(unknown.all())  # nothing known: skip the replacement (and its noise draws)
    if strength >= 1.0:
        x = _noise(x0_known, generator)
    else:
        x = noised(schedule, x0_known, grid[0], generator)
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        for r in range(resample + 1):
            if not everything:
                x = torch.where(unknown, x, noised(schedule, x0_known, t, generator))
            x0, eps = schedule.split_prediction(denoise(x, t), x, t)
            x_s = (ddpm_update(schedule, x, x0, t, s, generator) if sampler == "ddpm"
                   else ddim_update(schedule, x, x0, eps, t, s, eta, generator))
            x = renoise(schedule, x_s, s, t, generator) if r < resample else x_s
        if callback is not None:
            callback(i, t, x, x0)
    return torch.where(unknown, x, x0_known)
