"""Golden values of the diffusion schedule maths, worked out by hand on a 3-step chain."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ddpm.schedule import DiffusionSchedule, make_betas

# linear, T = 3: Ho et al.'s 1e-4..0.02 over 1000 steps rescaled by 1000/3 -> 1/30 .. 6.67, capped at 0.999
BETAS = [1 / 30, (1 / 30 + 0.999) / 2, 0.999]
ALPHAS = [1 - b for b in BETAS]
ALPHA_BAR = [ALPHAS[0], ALPHAS[0] * ALPHAS[1], ALPHAS[0] * ALPHAS[1] * ALPHAS[2]]


def test_linear_betas_and_cumulative_alphas():
    schedule = DiffusionSchedule(timesteps=3, beta_schedule="linear", prediction="eps")
    assert schedule.betas.tolist() == pytest.approx(BETAS, rel=1e-12)
    assert schedule.alpha_bar.tolist() == pytest.approx([0.9666666666666667, 0.4677055555555556,
                                                         0.0004677055555555556], rel=1e-12)
    assert schedule.alpha_bar.tolist() == pytest.approx(ALPHA_BAR, rel=1e-12)
    assert float(schedule.alpha_bar_at(-1)) == 1.0  # the clean end of the chain


def test_cosine_betas_follow_the_squared_cosine():
    f = [math.cos((t / 3 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(4)]
    expected_bar = [f[t + 1] / f[0] for t in range(3)]
    expected_bar[2] = expected_bar[1] * (1 - 0.999)  # last beta (1 - 0/f2 = 1) is capped at 0.999
    schedule = DiffusionSchedule(timesteps=3, beta_schedule="cosine", prediction="v")
    assert schedule.alpha_bar.tolist() == pytest.approx(expected_bar, rel=1e-9)
    # with many steps the rescaled linear schedule and the cosine one both end close to pure noise
    for kind in ("linear", "cosine"):
        assert float(torch.cumprod(1 - make_betas(kind, 1000), 0)[-1]) < 1e-4


def test_q_sample_golden():
    schedule = DiffusionSchedule(timesteps=3, beta_schedule="linear", prediction="eps")
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    noise = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    out = schedule.q_sample(x0, torch.tensor([1]), noise)
    a = ALPHA_BAR[1]
    expected = [math.sqrt(a) * 1.0 + math.sqrt(1 - a) * 0.5, math.sqrt(a) * -2.0 + math.sqrt(1 - a) * 0.25]
    assert out[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_posterior_golden():
    schedule = DiffusionSchedule(timesteps=3, beta_schedule="linear", prediction="eps")
    x0 = torch.tensor([[2.0]], dtype=torch.float64)
    x_t = torch.tensor([[-1.0]], dtype=torch.float64)
    mean, var = schedule.posterior_mean_variance(x0, x_t, torch.tensor([2]))
    a_t, a_prev, beta, alpha = ALPHA_BAR[2], ALPHA_BAR[1], BETAS[2], ALPHAS[2]
    coef_x0 = math.sqrt(a_prev) * beta / (1 - a_t)
    coef_xt = math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)
    assert float(mean) == pytest.approx(coef_x0 * 2.0 + coef_xt * -1.0, rel=1e-10)
    assert float(var) == pytest.approx(beta * (1 - a_prev) / (1 - a_t), rel=1e-10)
    # at t = 0 the posterior is the clean sample itself
    mean0, var0 = schedule.posterior_mean_variance(x0, x_t, torch.tensor([0]))
    assert float(mean0) == pytest.approx(2.0, rel=1e-12) and float(var0) == 0.0
    # a two-step jump (t=2 -> s=0) of the respaced chain
    mean_j, var_j = schedule.posterior_between(x0, x_t, 2, 0)
    a_s = ALPHA_BAR[0]
    beta_ts = 1 - a_t / a_s
    assert float(mean_j) == pytest.approx(math.sqrt(a_s) * beta_ts / (1 - a_t) * 2.0
                                          + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * -1.0, rel=1e-10)
    assert float(var_j) == pytest.approx(beta_ts * (1 - a_s) / (1 - a_t), rel=1e-10)


@pytest.mark.parametrize("beta_schedule,prediction", [("linear", "eps"), ("cosine", "x0"), ("cosine", "v")])
def test_targets_and_conversions_round_trip(beta_schedule, prediction):
    schedule = DiffusionSchedule(timesteps=10, beta_schedule=beta_schedule, prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 6, 9])
    x_t = schedule.q_sample(x0, t, noise)
    target = schedule.training_target(x0, noise, t)
    a = schedule.alpha_bar[t].reshape(-1, 1, 1)
    expected = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    torch.testing.assert_close(target, expected)
    for i, ti in enumerate(t.tolist()):
        x0_hat, eps_hat = schedule.split_prediction(target[i:i + 1], x_t[i:i + 1], ti)
        torch.testing.assert_close(x0_hat, x0[i:i + 1])
        torch.testing.assert_close(eps_hat, noise[i:i + 1])


def test_q_sample_between_two_levels():
    """x_s noised on to level t: sqrt(a_t / a_s) x_s + sqrt(1 - a_t / a_s) z; from the clean end (s = -1) the
    ordinary q_sample, and two hops have the forward marginal of one (same mean factor and variance)."""
    schedule = DiffusionSchedule(timesteps=3, beta_schedule="linear", prediction="eps")
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)

    def coefficients(t, s):  # (factor on x, factor on the noise)
        return float(schedule.q_sample(one, t, zero, s=s)), float(schedule.q_sample(zero, t, one, s=s))

    ratio = ALPHA_BAR[2] / ALPHA_BAR[0]
    assert coefficients(2, 0) == pytest.approx((math.sqrt(ratio), math.sqrt(1 - ratio)), rel=1e-12)
    assert coefficients(1, -1) == pytest.approx((math.sqrt(ALPHA_BAR[1]), math.sqrt(1 - ALPHA_BAR[1])), rel=1e-12)
    x = torch.tensor([[1.5], [-2.0]], dtype=torch.float64)
    z = torch.tensor([[-0.5], [0.25]], dtype=torch.float64)
    torch.testing.assert_close(schedule.q_sample(x, 1, z), schedule.q_sample(x, torch.tensor([1, 1]), z, s=-1))
    hop, first, direct = coefficients(2, 0), coefficients(0, -1), coefficients(2, -1)  # 0 -> 2 after clean -> 0
    assert hop[0] * first[0] == pytest.approx(direct[0], rel=1e-12)
    assert (hop[0] * first[1]) ** 2 + hop[1] ** 2 == pytest.approx(direct[1] ** 2, rel=1e-12)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionSchedule(timesteps=10, beta_schedule="quadratic", prediction="eps")
    with pytest.raises(ValueError, match="prediction"):
        DiffusionSchedule(timesteps=10, beta_schedule="linear", prediction="score")
    # the cosine schedule ends at alpha_bar ~ 2.4e-9: an eps network's x0 estimate is 2e4 times its error there
    with pytest.raises(ValueError, match=r"prediction=eps with beta_schedule=cosine .*2\.4e-09.*prediction=v"):
        DiffusionSchedule(timesteps=1000, beta_schedule="cosine", prediction="eps")


def test_the_config_refuses_eps_on_the_cosine_schedule_in_one_line():
    """At model construction from `config/model/diffusion.yaml`: its defaults (cosine, v) build, eps does not."""
    from ddpm_tiny import TINY_UNET, tiny_vqgan
    from utils.build import build
    from utils.errors import UserError
    from utils.paths import CONFIG_DIR

    node = OmegaConf.load(CONFIG_DIR / "model" / "diffusion.yaml").diffusion
    assert (node.beta_schedule, node.prediction) == ("cosine", "v")
    node.unet = OmegaConf.merge(node.unet, {k: v for k, v in TINY_UNET.items() if k != "decoder"})
    vqgan = tiny_vqgan()
    assert build(node, "model.diffusion", vqgan=vqgan, label_nc=3).schedule.prediction == "v"
    node.prediction = "eps"
    with pytest.raises(UserError, match="^model.diffusion: prediction=eps with beta_schedule=cosine") as err:
        build(node, "model.diffusion", vqgan=vqgan, label_nc=3)
    assert "\n" not in str(err.value)
    node.beta_schedule = "linear"
    assert build(node, "model.diffusion", vqgan=vqgan, label_nc=3).schedule.beta_schedule == "linear"
