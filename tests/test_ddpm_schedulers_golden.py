"""Full sampling loops pinned to stored numbers, and DPM-Solver++(2M) against an independent implementation.

The golden sums were computed once with the samplers as they were before they became scheduler objects
(`ddpm.samplers` of issue 12), so these tests prove the refactor kept every output for the same seed: each
sampler, partial-noise (SDEdit) starts, classifier-free guidance, RePaint inpainting with resampling, and the tiny
UNet whole and on windows. Analytic denoisers run in float64 (agreement to 1e-10), the UNet in float32.
"""
from __future__ import annotations

import math

import pytest
import torch

from ddpm.latent_diffusion import make_denoiser
from ddpm.repaint import repaint
from ddpm.samplers import SamplerSettings, guided, partial_start, run_sampler
from ddpm.schedule import DiffusionSchedule
from ddpm.unet import UNet3D
from ddpm.windowed import unet_window_denoiser
from ddpm_tiny import TINY_UNET

SHAPE = (2, 3, 4, 4, 2)


def analytic(x: torch.Tensor, t: int) -> torch.Tensor:
    """A smooth, nonlinear, timestep-dependent stand-in for a network."""
    return torch.tanh(1.3 * x) * (0.5 + t / 200) - 0.1 * x + 0.002 * t


def eps_like(x: torch.Tensor, t: int) -> torch.Tensor:
    """Close to the noise a pure-noise x_t holds (what an eps-predicting network gives there)."""
    return 0.9 * x + 0.1 * torch.tanh(x)


def analytic_pair(x_both: torch.Tensor, t: int) -> torch.Tensor:
    """Conditional half, null-condition half, as `guided` expects them."""
    cond, uncond = x_both.chunk(2)
    return torch.cat([analytic(cond, t), 0.8 * analytic(uncond, t) + 0.05])


def start(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def summary(out: torch.Tensor, trace: list) -> tuple[float, float, float, tuple[int, ...]]:
    """(sum, sum of squares) of the result, sum of every x0 prediction the callback saw, and its timesteps."""
    return (float(out.double().sum()), float(out.double().square().sum()),
            float(sum(float(x0.double().sum()) for _, x0 in trace)), tuple(t for t, _ in trace))


def tiny_unet() -> UNet3D:
    """A fixed random tiny UNet (every weight nonzero, so the output depends on the input and the label)."""
    torch.manual_seed(7)
    unet = UNet3D(in_channels=4, label_nc=3, label_downsample=(2, 2, 2), **TINY_UNET)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.1)
    return unet.eval()


def recorder(trace: list):
    return lambda i, t, x_t, x0: trace.append((t, x0.clone()))


def run_case(name: str) -> tuple:
    trace: list = []
    callback = recorder(trace)
    cosine_v = DiffusionSchedule(timesteps=100, beta_schedule="cosine", prediction="v")
    gen = torch.Generator().manual_seed(1)
    if name in ("ddpm", "ddim", "ddim_eta", "dpmpp_2m"):
        settings = {"ddpm": SamplerSettings("ddpm", 12), "ddim": SamplerSettings("ddim", 12),
                    "ddim_eta": SamplerSettings("ddim", 12, 0.7), "dpmpp_2m": SamplerSettings("dpmpp_2m", 12)}[name]
        out = run_sampler(settings, analytic, start(), cosine_v, generator=gen, callback=callback)
    elif name == "ddpm_linear_eps_full_grid":
        schedule = DiffusionSchedule(timesteps=30, beta_schedule="linear", prediction="eps")
        out = run_sampler(SamplerSettings("ddpm", 30), eps_like, start(), schedule, generator=gen, callback=callback)
    elif name == "ddim_linear_x0":
        schedule = DiffusionSchedule(timesteps=100, beta_schedule="linear", prediction="x0")
        out = run_sampler(SamplerSettings("ddim", 9, 0.4), analytic, start(), schedule, generator=gen,
                          callback=callback)
    elif name in ("sdedit_dpmpp_2m", "sdedit_ddim_eta", "sdedit_ddpm"):
        sampler, eta, strength = {"sdedit_dpmpp_2m": ("dpmpp_2m", 0.0, 0.55), "sdedit_ddim_eta": ("ddim", 0.3, 0.4),
                                  "sdedit_ddpm": ("ddpm", 0.0, 0.7)}[name]
        x = partial_start(cosine_v, 0.5 * start(2), start(), steps=12, strength=strength)
        out = run_sampler(SamplerSettings(sampler, 12, eta), analytic, x, cosine_v, strength=strength, generator=gen,
                          callback=callback)
    elif name == "guided_dpmpp_2m":
        out = run_sampler(SamplerSettings("dpmpp_2m", 8), guided(analytic_pair, 2.5), start(), cosine_v,
                          callback=callback)
    elif name in ("repaint_ddim", "repaint_ddpm_sdedit"):
        unknown = torch.zeros(1, 1, 4, 4, 2, dtype=torch.bool)
        unknown[..., 1:3, :, :] = True
        sampler, eta, strength, resample = {"repaint_ddim": ("ddim", 0.2, 1.0, 2),
                                            "repaint_ddpm_sdedit": ("ddpm", 0.0, 0.6, 1)}[name]
        out = repaint(analytic, 0.5 * start(2), unknown, cosine_v, sampler=sampler, steps=10, eta=eta,
                      strength=strength, resample=resample, generator=gen, callback=callback)
    elif name in ("tiny_unet_guided_dpmpp_2m", "tiny_unet_windows_ddim_eta"):
        unet, schedule = tiny_unet(), DiffusionSchedule(timesteps=50, beta_schedule="cosine", prediction="v")
        label = torch.randint(0, 3, (1, 1, 16, 8, 4), generator=torch.Generator().manual_seed(5))
        noise = torch.randn((1, 4, 8, 4, 2), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            if name == "tiny_unet_guided_dpmpp_2m":
                out = run_sampler(SamplerSettings("dpmpp_2m", 5), make_denoiser(unet, label, 2.0), noise, schedule,
                                  generator=gen, callback=callback)
            else:
                denoise = unet_window_denoiser(unet, label, window=(4, 4, 2), overlap=0.5,
                                               guidance_scale=1.5)
                out = run_sampler(SamplerSettings("ddim", 4, 0.5), denoise, noise, schedule, generator=gen,
                                  callback=callback)
    else:
        raise KeyError(name)
    return summary(out, trace)


# computed with the pre-scheduler samplers (git b0023c9); (sum, sum of squares, sum of x0 predictions, timesteps)
GOLDEN: dict[str, tuple] = {
    'ddpm': (-13.708202171794806, 36.53224574910908, -256.45274214602136,
        (99, 91, 82, 74, 66, 57, 49, 41, 32, 24, 16, 7)),
    'ddim': (-22.967494139577344, 37.30996854419746, -276.4792644615938,
        (99, 91, 82, 74, 66, 57, 49, 41, 32, 24, 16, 7)),
    'ddim_eta': (-14.245278439008123, 38.479336398669595, -238.4047243465627,
        (99, 91, 82, 74, 66, 57, 49, 41, 32, 24, 16, 7)),
    'dpmpp_2m': (-23.63432587459132, 49.19753711095524, -279.3602016809168,
        (99, 91, 82, 74, 66, 57, 49, 41, 32, 24, 16, 7)),
    'ddpm_linear_eps_full_grid': (8.493861243181115, 32.05361355787135, -62.75269133995192,
        tuple(range(29, -1, -1))),
    'ddim_linear_x0': (8.282576913482819, 14.07933535411335, 168.17023758461275,
        (99, 88, 77, 66, 55, 43, 32, 21, 10)),
    'sdedit_dpmpp_2m': (-18.53098247980119, 55.94798394070944, -115.12938967730832,
        (49, 41, 32, 24, 16, 7)),
    'sdedit_ddim_eta': (-14.40502825494381, 39.42544649150592, -62.639502487294195,
        (32, 24, 16, 7)),
    'sdedit_ddpm': (-13.50819544090265, 42.88559549523974, -127.59382288650039,
        (66, 57, 49, 41, 32, 24, 16, 7)),
    'guided_dpmpp_2m': (-9.723191407620353, 27.268448073777133, -104.73039414094764,
        (99, 87, 74, 61, 49, 37, 24, 11)),
    'repaint_ddim': (0.7807381722012361, 44.35826195668297, -174.21534707264152,
        (99, 89, 79, 69, 59, 49, 39, 29, 19, 9)),
    'repaint_ddpm_sdedit': (-3.9217848930543653, 35.93984997171758, -80.78797799157668,
        (59, 49, 39, 29, 19, 9)),
    'tiny_unet_guided_dpmpp_2m': (-16.167281106114388, 470.6633167554593, -67.32994799059816,
        (49, 39, 29, 19, 9)),
    'tiny_unet_windows_ddim_eta': (-12.427407702431083, 332.59295567730953, -55.31336654163897,
        (49, 37, 24, 11)),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_full_loops_reproduce_the_stored_outputs(name):
    total, squares, x0_total, timesteps = run_case(name)
    expected = GOLDEN[name]
    tolerance = 1e-5 if name.startswith("tiny_unet") else 1e-10
    assert timesteps == expected[3]
    for got, want in zip((total, squares, x0_total), expected[:3]):
        assert got == pytest.approx(want, rel=tolerance, abs=tolerance)


def dpm_solver_pp_2m_reference(data_prediction, x: torch.Tensor, alpha_bar: list[float], grid: list[int]):
    """DPM-Solver++(2M) as published (Lu et al. 2022, Algorithm 2: multistep, second order, data prediction,
    steps in lambda = log(alpha / sigma)), written out on plain floats, with the same ends as ours: first order
    at the first step, and a last step to sigma = 0 (lambda = inf), where the first-order update is x0 itself."""
    alpha = [math.sqrt(alpha_bar[t]) for t in grid]
    sigma = [math.sqrt(1 - alpha_bar[t]) for t in grid]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    x0_previous = None
    for i in range(len(grid)):
        x0 = data_prediction(x, grid[i], alpha[i], sigma[i])
        if i + 1 == len(grid):
            return x0
        h = lam[i + 1] - lam[i]
        if x0_previous is None:
            d = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_previous
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (math.exp(-h) - 1) * d
        x0_previous = x0
    return x


@pytest.mark.parametrize("steps,strength", [(2, 1.0), (4, 1.0), (7, 1.0), (7, 0.6)])
def test_dpm_solver_pp_2m_is_the_published_update(steps, strength):
    """Against the reference above with a v-predicting analytic network (x0 = alpha x - sigma v); the same run
    with first-order steps only (DDIM) is far off, so the second-order term is really checked."""
    schedule = DiffusionSchedule(timesteps=100, beta_schedule="cosine", prediction="v")
    grid = [round(100 - i * 100 / steps) - 1 for i in range(steps)]
    grid = [t for t in grid if t < strength * 100] if strength < 1 else grid
    x = start()
    ours = run_sampler(SamplerSettings("dpmpp_2m", steps), analytic, x, schedule, strength=strength)
    reference = dpm_solver_pp_2m_reference(lambda x_t, t, a, s: a * x_t - s * analytic(x_t, t), x,
                                           schedule.alpha_bar.tolist(), grid)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    if len(grid) > 2:
        first_order = run_sampler(SamplerSettings("ddim", steps), analytic, x, schedule, strength=strength)
        assert float((first_order - reference).abs().max()) > 1e-3
