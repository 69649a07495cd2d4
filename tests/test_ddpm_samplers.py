"""Samplers against denoisers whose answer is known: an oracle that knows x0, and the exact posterior-mean
denoiser of Gaussian data, for which the sampled distribution is known; the scheduler objects' interface."""
from __future__ import annotations

import pytest
import torch

from ddpm.samplers import (DDIMScheduler, DDPMScheduler, DPMSolverPlusPlusScheduler, SamplerSettings, guided,
                           make_scheduler, partial_grid, run_sampler, sample_loop, sampling_timesteps)
from ddpm.schedule import DiffusionSchedule


def oracle(schedule: DiffusionSchedule, x0: torch.Tensor):
    """Denoiser that knows the clean sample: returns the target consistent with x0 and the x_t it is given."""

    def denoise(x_t, t):
        a = schedule.alpha_bar_at(t).to(x_t.dtype)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return schedule.training_target(x0, eps, torch.full((x_t.shape[0],), t))

    return denoise


def gaussian_data_denoiser(schedule: DiffusionSchedule, mu: float, s: float):
    """E[x0 | x_t] for x0 ~ N(mu, s^2), returned as the schedule's prediction target."""

    def denoise(x_t, t):
        a = schedule.alpha_bar_at(t).to(x_t.dtype)
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x_t - a.sqrt() * mu)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return schedule.training_target(x0, eps, torch.full((x_t.shape[0],), t))

    return denoise


def test_timestep_grid():
    assert sampling_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert sampling_timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    grid = sampling_timesteps(1000, 37)
    assert len(grid) == 37 and grid[0] == 999 and 0 <= grid[-1] < 1000 / 37
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert sampling_timesteps(10, 1) == [9]
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(10, 11)


ALLOWED = [("linear", "eps"), ("linear", "x0"), ("linear", "v"), ("cosine", "x0"), ("cosine", "v")]


def sample_ddim(denoise, x_start, schedule, *, steps, eta=0.0, generator=None):
    return run_sampler(SamplerSettings("ddim", steps, eta), denoise, x_start, schedule, generator=generator)


@pytest.mark.parametrize("beta_schedule,prediction", ALLOWED)
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_deterministic_samplers_follow_the_oracle_trajectory(beta_schedule, prediction, sampler):
    """With an oracle x0, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at every visited step for the same eps as at
    the start, and the last step lands exactly on x0."""
    schedule = DiffusionSchedule(timesteps=100, beta_schedule=beta_schedule, prediction=prediction)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, 4, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    a_start = schedule.alpha_bar_at(99)
    x_start = a_start.sqrt() * x0 + (1 - a_start).sqrt() * eps
    visited = []
    grid = sampling_timesteps(100, 7)

    def record(i, t, x_t, x0_pred):
        visited.append(x_t.clone())
        torch.testing.assert_close(x0_pred, x0)

    out = run_sampler(SamplerSettings(sampler, 7, 0.0), oracle(schedule, x0), x_start, schedule, callback=record)
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)
    for i, x_t in enumerate(visited[:-1]):
        a = schedule.alpha_bar_at(grid[i + 1])
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-9, atol=1e-9)


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    schedule = DiffusionSchedule(timesteps=50, beta_schedule="linear", prediction="eps")
    denoise = gaussian_data_denoiser(schedule, 0.5, 0.3)
    x_start = torch.randn(4, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample_ddim(denoise, x_start, schedule, steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(denoise, x_start, schedule, steps=10, eta=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sample_ddim(denoise, x_start, schedule, steps=10, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c)


def test_ddpm_equals_ddim_with_eta_one():
    """Ancestral sampling from the posterior and DDIM with eta = 1 are the same update; with the same noise
    stream they give the same result."""
    schedule = DiffusionSchedule(timesteps=40, beta_schedule="cosine", prediction="v")
    denoise = gaussian_data_denoiser(schedule, -0.2, 0.7)
    x_start = torch.randn(3, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = run_sampler(SamplerSettings("ddpm", 13), denoise, x_start, schedule, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(denoise, x_start, schedule, steps=13, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler,steps,eta,tol", [("ddpm", 1000, 0.0, 0.006), ("ddim", 1000, 1.0, 0.006),
                                                    ("ddim", 200, 0.0, 0.006), ("dpmpp_2m", 50, 0.0, 0.004)])
def test_samplers_reproduce_gaussian_data(sampler, steps, eta, tol):
    """Data x0 ~ N(0.7, 0.25^2) with its exact denoiser: samples must have that mean and standard deviation
    (20000 samples: the estimates themselves are good to ~0.002)."""
    schedule = DiffusionSchedule(timesteps=1000, beta_schedule="cosine", prediction="v")
    denoise = gaussian_data_denoiser(schedule, 0.7, 0.25)
    gen = torch.Generator().manual_seed(3)
    x_start = torch.randn(20000, 1, generator=gen, dtype=torch.float64)
    out = run_sampler(SamplerSettings(sampler, steps, eta), denoise, x_start, schedule, generator=gen)
    assert float(out.mean()) == pytest.approx(0.7, abs=tol)
    assert float(out.std()) == pytest.approx(0.25, abs=tol)


def test_dpm_solver_converges_faster_than_ddim():
    """Second order pays off: on the deterministic flow, DPM-Solver++(2M) with 20 steps maps each starting point
    much closer to the 1000-step solution than DDIM with 20 steps does."""
    schedule = DiffusionSchedule(timesteps=1000, beta_schedule="cosine", prediction="v")
    denoise = gaussian_data_denoiser(schedule, 0.7, 0.25)
    x_start = torch.randn(1000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    reference = sample_ddim(denoise, x_start, schedule, steps=1000)
    err_dpm = (run_sampler(SamplerSettings("dpmpp_2m", 20), denoise, x_start, schedule) - reference).abs().mean()
    err_ddim = (sample_ddim(denoise, x_start, schedule, steps=20) - reference).abs().mean()
    assert err_dpm < 0.5 * err_ddim


def test_guidance_formula_in_one_batched_call():
    calls = []

    def pair(x_both, t):
        calls.append(x_both.shape[0])
        half = x_both.shape[0] // 2
        return torch.cat([torch.full_like(x_both[:half], 3.0), torch.full_like(x_both[half:], 1.0)])

    out = guided(pair, 2.5)(torch.zeros(2, 1, 2, 2, 2), 7)
    assert calls == [4]  # conditional and unconditional halves in one forward
    torch.testing.assert_close(out, torch.full((2, 1, 2, 2, 2), 1.0 + 2.5 * (3.0 - 1.0)))


def test_bad_sampler_settings():
    with pytest.raises(ValueError, match="sampler"):
        SamplerSettings("euler", 10)
    with pytest.raises(ValueError, match="eta"):
        SamplerSettings("ddim", 10, -1.0)


def near_ideal_denoiser(schedule: DiffusionSchedule, generator: torch.Generator, error: float = 0.01):
    """The exact denoiser of unit-variance Gaussian data (E[x0 | x_t] = sqrt(a) x_t, E[eps | x_t] = sqrt(1 - a)
    x_t) as the schedule's target, plus a 1 % error: fresh N(0, error^2) noise on every output."""

    def denoise(x_t, t):
        a = schedule.alpha_bar_at(t).to(x_t.dtype)
        target = schedule.training_target(a.sqrt() * x_t, (1 - a).sqrt() * x_t, torch.full((x_t.shape[0],), t))
        return target + error * torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype)

    return denoise


@pytest.mark.parametrize("beta_schedule,prediction", ALLOWED)
@pytest.mark.parametrize("sampler,steps", [("ddim", 50), ("dpmpp_2m", 25), ("ddpm", 50)])
def test_a_near_ideal_network_gives_unit_variance_samples(beta_schedule, prediction, sampler, steps):
    """Every allowed (schedule, prediction): a 1 % network error stays a small error of the samples (with eps on
    the cosine schedule it became std 6.3 for DDIM-50 and 12.1 for DPM-Solver++ 25; that pair is refused)."""
    schedule = DiffusionSchedule(timesteps=1000, beta_schedule=beta_schedule, prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    x_start = torch.randn(4000, 1, generator=gen, dtype=torch.float64)
    out = run_sampler(SamplerSettings(sampler, steps), near_ideal_denoiser(schedule, gen), x_start, schedule,
                      generator=gen)
    assert float(out.std()) == pytest.approx(1.0, abs=0.08)
    assert abs(float(out.mean())) < 0.05


def test_schedulers_set_their_grid_and_step_through_it():
    schedule = DiffusionSchedule(timesteps=100, beta_schedule="cosine", prediction="v")
    for scheduler in (DDPMScheduler(schedule), DDIMScheduler(schedule, eta=0.5), DPMSolverPlusPlusScheduler(schedule)):
        scheduler.set_timesteps(10)
        assert scheduler.timesteps == sampling_timesteps(100, 10)
        assert [scheduler.next_timestep(t) for t in scheduler.timesteps] == scheduler.timesteps[1:] + [-1]
        scheduler.set_timesteps(10, strength=0.5)  # SDEdit: only the low-noise half of the same grid
        assert scheduler.timesteps == partial_grid(100, 10, 0.5) == [49, 39, 29, 19, 9]
        with pytest.raises(ValueError, match="not on the grid"):
            scheduler.step(torch.zeros(1, 1), 50, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="eta"):
        DDIMScheduler(schedule, eta=-0.1)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_a_loop_over_step_is_the_sampler_and_set_timesteps_clears_the_state(name):
    """`for t in timesteps: x = step(denoise(x, t), t, x)` is `run_sampler`, with `x0_pred` what the callback
    sees; after set_timesteps a used scheduler (DPM-Solver++ keeps the previous x0) gives the same again."""
    schedule = DiffusionSchedule(timesteps=60, beta_schedule="linear", prediction="x0")
    denoise = gaussian_data_denoiser(schedule, 0.3, 0.5)
    x_start = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    reference = run_sampler(SamplerSettings(name, 8, 0.6), denoise, x_start, schedule,
                            generator=torch.Generator().manual_seed(1), callback=lambda i, t, x, x0: seen.append(x0))
    scheduler = make_scheduler(SamplerSettings(name, 8, 0.6), schedule)
    for _ in range(2):
        gen, x, predictions = torch.Generator().manual_seed(1), x_start, []
        for t in scheduler.timesteps:
            x = scheduler.step(denoise(x, t), t, x, gen)
            predictions.append(scheduler.x0_pred)
        torch.testing.assert_close(x, reference, rtol=0, atol=0)
        for a, b in zip(predictions, seen, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        scheduler.set_timesteps(8)
    if name == "dpmpp_2m":  # without set_timesteps the first step would extrapolate from the last run's x0
        sample_loop(scheduler, denoise, x_start)
        assert not torch.allclose(sample_loop(scheduler, denoise, x_start), reference)
