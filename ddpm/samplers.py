"""Reverse-process samplers: one scheduler object per sampler and one sampling loop.

A scheduler (as in diffusers) owns the timestep grid and turns one model output into the next sample:
- `set_timesteps(steps, strength=1.0)` sets `timesteps`, the `steps` timesteps of `sampling_timesteps` (evenly
  spaced from T-1 down); with `strength` < 1 only those below `strength * T` (`partial_grid`: Meng et al. 2022's
  SDEdit, started from a real latent noised to the first of them by `partial_start`), and clears any state;
- `step(model_output, t, x_t, generator=None) -> x_s` moves from grid timestep t to the next one, s; the update
  after the last timestep goes to the clean end of the chain (alpha_bar = 1), so the result is a sample of x0.
  `x0_pred` is then that step's estimate of the clean sample.

`DDPMScheduler`: ancestral sampling from the true posterior q(x_s | x_t, x0_hat) of the (respaced) chain;
`DDIMScheduler(eta)`: Song et al. 2021, `eta` = 0 deterministic, `eta` = 1 the same distribution as DDPM;
`DPMSolverPlusPlusScheduler`: DPM-Solver++(2M) (Lu et al. 2022), second-order multistep in log-SNR with data
prediction, first order at the first and last step; it keeps the previous step's x0 (cleared by set_timesteps).

`sample_loop(scheduler, denoise, x_t)` is the loop, one `denoise(x_t, t) -> model output` call and one `step` per
timestep; `run_sampler(settings, ...)` runs it with the scheduler named in `SamplerSettings`. The schedulers know
nothing about networks, labels or guidance: whoever calls them wraps the UNet (its label features, classifier-free
guidance through `guided`, the windowed evaluation of `ddpm.windowed`) into `denoise`, which gets `t` as a Python
int (one timestep for the whole batch). RePaint inpainting (`ddpm.repaint`) is another loop over `step`.
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


def gaussian(shape, *, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator gives the same numbers whatever
    device the model runs on), then moved to `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return gaussian(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _scalar(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype)


# the schedulers ------------------------------------------------------------------------------------------------
class Scheduler:
    """The grid and the step every sampler shares: the model output at x_t is split into (x0, eps), and
    `update` moves x_t to the next grid timestep s (s = -1: the clean end)."""

    def __init__(self, schedule: DiffusionSchedule):
        self.schedule = schedule
        self.timesteps: list[int] = []
        self.x0_pred: torch.Tensor | None = None
        self._next: dict[int, int] = {}

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None:
        self.timesteps = partial_grid(self.schedule.timesteps, steps, strength)
        self._next = dict(zip(self.timesteps, self.timesteps[1:] + [-1]))
        self.x0_pred = None

    def next_timestep(self, t: int) -> int:
        """The grid timestep after `t` (-1 after the last one: the clean end)."""
        if t not in self._next:
            raise ValueError(f"timestep {t} is not on the grid {self.timesteps} (call set_timesteps first)")
        return self._next[t]

    def step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.next_timestep(t)
        x0, eps = self.schedule.split_prediction(model_output, x_t, t)
        self.x0_pred = x0
        return self.update(x_t, x0, eps, t, s, generator)

    def update(self, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: int, s: int,
               generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError


class DDPMScheduler(Scheduler):
    def update(self, x_t, x0, eps, t, s, generator):
        """x_s drawn from the posterior q(x_s | x_t, x0) (its mean at the clean end, s = -1)."""
        mean, variance = self.schedule.posterior_between(x0, x_t, t, s)
        return mean + variance.sqrt() * gaussian_like(x_t, generator) if s >= 0 else mean


class DDIMScheduler(Scheduler):
    def __init__(self, schedule: DiffusionSchedule, eta: float = 0.0):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        super().__init__(schedule)
        self.eta = eta

    def update(self, x_t, x0, eps, t, s, generator):
        a_t, a_s = self.schedule.alpha_bar_at(t), self.schedule.alpha_bar_at(s)
        sigma = self.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        direction = (1 - a_s - sigma**2).clamp(min=0).sqrt()
        x_s = _scalar(a_s.sqrt(), x_t) * x0 + _scalar(direction, x_t) * eps
        if s >= 0 and self.eta > 0:
            x_s = x_s + _scalar(sigma, x_t) * gaussian_like(x_t, generator)
        return x_s


class DPMSolverPlusPlusScheduler(Scheduler):
    """x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D, h = lambda_s - lambda_t, lambda = log(alpha/sigma),
    with D the x0 prediction (first order) or its linear extrapolation from the previous step's (second order:
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_previous, r = h_previous / h). The last step goes to sigma = 0: x_s = x0.
    Multistep: `step` must visit the grid in order, once per timestep."""

    _previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0, h) of the step before

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None:
        super().set_timesteps(steps, strength)
        self._previous = None

    def _alpha_sigma_lambda(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.schedule.alpha_bar_at(t)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def update(self, x_t, x0, eps, t, s, generator):
        if s < 0:
            return x0
        _, sigma_t, lambda_t = self._alpha_sigma_lambda(t)
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(s)
        h = lambda_s - lambda_t
        if self._previous is None:
            d = x0
        else:
            previous_x0, previous_h = self._previous
            r = previous_h / h
            d = _scalar(1 + 1 / (2 * r), x0) * x0 - _scalar(1 / (2 * r), x0) * previous_x0
        self._previous = (x0, h)
        return _scalar(sigma_s / sigma_t, x_t) * x_t - _scalar(alpha_s * torch.expm1(-h), x_t) * d


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


def make_scheduler(settings: SamplerSettings, schedule: DiffusionSchedule, strength: float = 1.0) -> Scheduler:
    """The scheduler named in `settings`, its timesteps set for `settings.steps` and `strength`."""
    if settings.name == "ddpm":
        scheduler = DDPMScheduler(schedule)
    elif settings.name == "ddim":
        scheduler = DDIMScheduler(schedule, eta=settings.eta)
    else:
        scheduler = DPMSolverPlusPlusScheduler(schedule)
    scheduler.set_timesteps(settings.steps, strength)
    return scheduler


# the loop ------------------------------------------------------------------------------------------------------
def sample_loop(scheduler: Scheduler, denoise: Denoiser, x_t: torch.Tensor, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """x0 from `x_t` at the scheduler's first timestep; `callback(index, t, x_s, x0_pred)` after every step."""
    for i, t in enumerate(scheduler.timesteps):
        x_t = scheduler.step(denoise(x_t, t), t, x_t, generator)
        if callback is not None:
            callback(i, t, x_t, scheduler.x0_pred)
    return x_t


def run_sampler(settings: SamplerSettings, denoise: Denoiser, x_t: torch.Tensor, schedule: DiffusionSchedule, *,
                strength: float = 1.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None) -> torch.Tensor:
    """Sample x0 from the starting noise `x_t` (with `strength` < 1: from `partial_start`) with the sampler
    named in `settings`."""
    return sample_loop(make_scheduler(settings, schedule, strength), denoise, x_t, generator=generator,
                       callback=callback)


def partial_start(schedule: DiffusionSchedule, x0: torch.Tensor, noise: torch.Tensor, *, steps: int,
                  strength: float) -> torch.Tensor:
    """Where a sampler with `strength` < 1 starts: `x0` (a real latent) noised to the first kept timestep."""
    return schedule.q_sample(x0, partial_grid(schedule.timesteps, steps, strength)[0], noise)


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
