"""Discrete-time Gaussian diffusion maths: the beta schedule, forward noising, the true posterior and the
conversions between what a network predicts (noise `eps`, clean sample `x0`, or velocity `v`) and the others.

Notation (Ho et al. 2020): alpha_bar[t] = prod_{s<=t} (1 - beta[s]), x_t = sqrt(alpha_bar[t]) x0 +
sqrt(1 - alpha_bar[t]) eps, and v = sqrt(alpha_bar[t]) eps - sqrt(1 - alpha_bar[t]) x0 (Salimans & Ho 2022).
Everything is kept in float64 and cast to the input's dtype at use, so 1 - alpha_bar stays exact near t = 0.
Nothing is clipped: latents are not bounded to [-1, 1].

`prediction=eps` with `beta_schedule=cosine` is refused: the cosine schedule's last beta is capped at 0.999, so
alpha_bar ends near 2.4e-9 and x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies any error of an
eps network by about 2e4 at the first sampling step (a 1 % error gives samples of std 6 for unit-variance data).
Predicting v or x0 is stable there, and so is eps on the linear schedule (alpha_bar ends near 4e-5).
"""
from __future__ import annotations

import math

import torch
from torch import nn

BETA_SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")


def make_betas(kind: str, timesteps: int) -> torch.Tensor:
    """linear: Ho et al.'s 1e-4..0.02 over 1000 steps, rescaled to `timesteps` so the total noise is the same;
    cosine: Nichol & Dhariwal 2021 (offset 0.008, betas capped at 0.999)."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be at least 1, got {timesteps}")
    if kind == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), timesteps, dtype=torch.float64)
    if kind == "cosine":
        offset = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {kind!r}")


def _shaped(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value, or one per sample, shaped (B or 1, 1, 1, ...) in `like`'s dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class DiffusionSchedule(nn.Module):
    """Buffers of one beta schedule and the formulas built on them. `alpha_bar_at(t)` also accepts t = -1,
    meaning the clean end of the chain (alpha_bar = 1), which samplers use as their last target."""

    def __init__(self, *, timesteps: int, beta_schedule: str, prediction: str):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.timesteps = timesteps
        self.beta_schedule = beta_schedule
        self.prediction = prediction
        betas = make_betas(beta_schedule, timesteps)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        if prediction == "eps" and beta_schedule == "cosine":
            raise ValueError(f"prediction=eps with beta_schedule=cosine is unstable (alpha_bar ends at "
                             f"{float(alpha_bar[-1]):.1e}: the x0 estimate multiplies the noise error by "
                             f"{float(alpha_bar[-1]) ** -0.5:.0f}); use prediction=v or x0, or beta_schedule=linear")
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)
        self.register_buffer("alpha_bar_prev", alpha_bar_prev, persistent=False)

    def alpha_bar_at(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_bar[t] as float64, with alpha_bar[-1] := 1."""
        t = torch.as_tensor(t, device=self.alpha_bar.device).long()
        padded = torch.cat([self.alpha_bar, torch.ones(1, dtype=torch.float64, device=self.alpha_bar.device)])
        return padded[torch.where(t < 0, torch.full_like(t, self.timesteps), t)]

    # forward process ------------------------------------------------------------------------------------------
    def q_sample(self, x: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor,
                 s: torch.Tensor | int = -1) -> torch.Tensor:
        """A draw of x_t given x_s (t > s) under the forward process: sqrt(a_t / a_s) x + sqrt(1 - a_t / a_s)
        noise; by default s = -1, x is the clean sample and this is x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise.
        `t` (and `s`) are one timestep or one per sample."""
        ratio = self.alpha_bar_at(t) / self.alpha_bar_at(s)
        return _shaped(ratio.sqrt(), x) * x + _shaped((1 - ratio).sqrt(), x) * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for this prediction type."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = _shaped(self.alpha_bar_at(t), x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    # posterior q(x_{t-1} | x_t, x0) -----------------------------------------------------------------------------
    def posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0) for one step of the full chain (variance 0 at t = 0)."""
        return self.posterior_between(x0, x_t, t, t - 1)

    def posterior_between(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, s: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_s | x_t, x0) for s < t on the same chain (s = -1: the clean sample). With
        s = t - 1 these are Ho et al.'s eq. 7; with a coarser grid they are those of the respaced chain."""
        a_t = self.alpha_bar_at(t)
        a_s = self.alpha_bar_at(s)
        a_ts = a_t / a_s  # alpha_bar of the step s -> t
        beta_ts = 1 - a_ts
        coef_x0 = a_s.sqrt() * beta_ts / (1 - a_t)
        coef_xt = a_ts.sqrt() * (1 - a_s) / (1 - a_t)
        variance = beta_ts * (1 - a_s) / (1 - a_t)
        return _shaped(coef_x0, x_t) * x0 + _shaped(coef_xt, x_t) * x_t, _shaped(variance, x_t)

    # conversions ---------------------------------------------------------------------------------------------
    def split_prediction(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the network output at x_t, whatever the prediction type."""
        a = _shaped(self.alpha_bar_at(t), x_t)
        sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
        if self.prediction == "eps":
            eps = model_output
            return (x_t - sqrt_1ma * eps) / sqrt_a, eps
        if self.prediction == "x0":
            x0 = model_output
            return x0, (x_t - sqrt_a * x0) / sqrt_1ma
        v = model_output
        return sqrt_a * x_t - sqrt_1ma * v, sqrt_1ma * x_t + sqrt_a * v
