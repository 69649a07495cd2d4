"""Reverse-process samplers over a `denoise(x_t, t) -> model output` callable.

The samplers know nothing about networks, labels or guidance: whoever calls them wraps the UNet (with its label
features, guidance, or later a windowed/tiled evaluation) into `denoise`. `t` is passed as a Python int (the
same timestep for the whole batch). Each sampler visits the `steps` timesteps of `sampling_timesteps` (evenly
spaced from T-1 down) and its last update goes to the clean end of the chain (alpha_bar = 1), so the result is a
sample of x0.

- `ddpm`: ancestral sampling from the true posterior q(x_s | x_t, x0_hat) of the (respaced) chain;
- `ddim`: Song et al. 2021, `eta` = 0 deterministic, `eta` = 1 the same distribution as `ddpm`;
- `dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022), second-order multistep in log-SNR with data prediction,
  first order at the first and last step.

`strength` < 1 (a partial-noise start, Meng et al. 2022's SDEdit) keeps only the grid steps below
`strength * T`: the caller passes a real latent noised to the first of them (`partial_start`) instead of noise.
`ddpm_update`/`ddim_update` are the one-step updates, shared with the inpainting loop of `ddpm.repaint`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ddpm.schedule import DiffusionSchedule

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


class StepCallback(Protocol):
    def __call__(self, index: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None: ...


def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` distinct integer timesteps from T-1 down, evenly spaced ("trailing": T-1, T-1-T/steps, ...,
    T/steps-1; all of T-1..0 when steps = T). The update after the last one goes to the clean end of the chain,
    so every network evaluation moves the sample (none is spent at t = 0 when steps < T)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and the {timesteps} training timesteps, got {steps}")
    return [round(timesteps - i * timesteps / steps) - 1 for i in range(steps)]


def partial_grid(timesteps: int, steps: int, strength: float = 1.0) -> list[int]:
    """The grid of `sampling_timesteps`, keeping only the timesteps below `strength * timesteps` (at least the
    last one): strength 1 is the whole grid, 0.5 its lower half."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    grid = sampling_timesteps(timesteps, steps)
    return grid if strength == 1.0 else [t for t in grid if t < strength * timesteps] or grid[-1:]


@dataclass
class SamplerSettings:
    name: str = "ddim"
    steps: int = 50
    eta: float = 0.0

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.name!r}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")


def gaussian(shape, *, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator gives the same numbers whatever
    device the model runs on), then moved to `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return gaussian(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _scalar(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype)


def partial_start(schedule: DiffusionSchedule, x0: torch.Tensor, noise: torch.Tensor, *, steps: int,
                  strength: float) -> torch.Tensor:
    """Where a sampler with `strength` < 1 starts: `x0` (a real latent) noised to the first kept timestep."""
    t = partial_grid(schedule.timesteps, steps, strength)[0]
    return schedule.q_sample(x0, torch.tensor([t], device=x0.device), noise)


def ddpm_update(schedule: DiffusionSchedule, x_t: torch.Tensor, x0: torch.Tensor, t: int, s: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """x_s drawn from the posterior q(x_s | x_t, x0) (its mean at the clean end, s = -1)."""
    mean, variance = schedule.posterior_between(x0, x_t, t, s)
    return mean + variance.sqrt() * _noise_like(x_t, generator) if s >= 0 else mean


def ddim_update(schedule: DiffusionSchedule, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: int,
                s: int, eta: float, generator: torch.Generator | None) -> torch.Tensor:
    a_t, a_s = schedule.alpha_bar_at(t), schedule.alpha_bar_at(s)
    sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
    direction = (1 - a_s - sigma**2).clamp(min=0).sqrt()
    x_s = _scalar(a_s.sqrt(), x_t) * x0 + _scalar(direction, x_t) * eps
    if s >= 0 and eta > 0:
        x_s = x_s + _scalar(sigma, x_t) * _noise_like(x_t, generator)
    return x_s


def sample_ddpm(denoise: Denoiser, x_t: torch.Tensor, schedule: DiffusionSchedule, *, steps: int,
                strength: float = 1.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    grid = partial_grid(schedule.timesteps, steps, strength)
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        x0, _ = schedule.split_prediction(denoise(x_t, t), x_t, t)
        x_t = ddpm_update(schedule, x_t, x0, t, s, generator)
        if callback is not None:
            callback(i, t, x_t, x0)
    return x_t


def sample_ddim(denoise: Denoiser, x_t: torch.Tensor, schedule: DiffusionSchedule, *, steps: int,
                eta: float = 0.0, strength: float = 1.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    grid = partial_grid(schedule.timesteps, steps, strength)
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        x0, eps = schedule.split_prediction(denoise(x_t, t), x_t, t)
        x_t = ddim_update(schedule, x_t, x0, eps, t, s, eta, generator)
        if callback is not None:
            callback(i, t, x_t, x0)
    return x_t


def sample_dpmpp_2m(denoise: Denoiser, x_t: torch.Tensor, schedule: DiffusionSchedule, *, steps: int,
                    strength: float = 1.0, generator: torch.Generator | None = None,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D, h = lambda_s - lambda_t, lambda = log(alpha/sigma),
    with D the x0 prediction (first order) or its linear extrapolation from the previous step (second order).
    The last step goes to sigma = 0, where x_s = D."""
    del generator  # deterministic solver
    grid = partial_grid(schedule.timesteps, steps, strength)

    def alpha_sigma_lambda(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = schedule.alpha_bar_at(t)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    previous_x0, previous_h = None, None
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        x0, _ = schedule.split_prediction(denoise(x_t, t), x_t, t)
        if s < 0:
            x_next = x0
        else:
            _, sigma_t, lambda_t = alpha_sigma_lambda(t)
            alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(s)
            h = lambda_s - lambda_t
            if previous_x0 is None:
                d = x0
            else:
                r = previous_h / h
                d = _scalar(1 + 1 / (2 * r), x0) * x0 - _scalar(1 / (2 * r), x0) * previous_x0
            x_next = _scalar(sigma_s / sigma_t, x_t) * x_t - _scalar(alpha_s * torch.expm1(-h), x_t) * d
            previous_h = h
        previous_x0 = x0
        x_t = x_next
        if callback is not None:
            callback(i, t, x_t, x0)
    return x_t


def run_sampler(settings: SamplerSettings, denoise: Denoiser, x_t: torch.Tensor, schedule: DiffusionSchedule, *,
                strength: float = 1.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Sample x0 from the starting noise `x_t` (with `strength` < 1: from `partial_start`) with the sampler
    named in `settings`."""
    common = dict(steps=settings.steps, strength=strength, callback=callback)
    if settings.name == "ddpm":
        return sample_ddpm(denoise, x_t, schedule, generator=generator, **common)
    if settings.name == "ddim":
        return sample_ddim(denoise, x_t, schedule, eta=settings.eta, generator=generator, **common)
    return sample_dpmpp_2m(denoise, x_t, schedule, **common)


def guided(denoise_pair: Callable[[torch.Tensor, int], torch.Tensor], guidance_scale: float) -> Denoiser:
    """Classifier-free guidance over a `denoise_pair(x_both, t)` that evaluates the conditional and the
    unconditional model in one batched forward (first half conditional, second half null condition):
    out = uncond + scale * (cond - uncond). A scale of 1 is the conditional model alone, so the caller should
    not build the pair then."""

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        out = denoise_pair(torch.cat([x_t, x_t]), t)
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return denoise
