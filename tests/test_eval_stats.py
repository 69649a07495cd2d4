"""The paired case bootstrap with seeds as the inner level: an interval computed by hand, sampled draws against
exact enumeration, NaN handling, near-nominal coverage on simulated studies, the few-cases flag."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from evaluation.stats import paired_bootstrap, resample_indices
from utils.errors import UserError

NAN = float("nan")


def test_three_cases_reproduce_the_hand_computed_interval():
    real = [[0.2, 0.2, 0.2], [0.2, 0.2, 0.2]]
    arm = [[0.1, 0.5, 0.8], [0.3, NAN, 0.8]]  # seed means per case 0.2, 0.5, 0.8; differences 0, 0.3, 0.6
    out = paired_bootstrap({"real": real, "arm": arm}, "real", samples=27, confidence=0.95, seed=0)
    # 27 equally likely draws of 3 cases; the mean difference is 0.1 * K, K = sum of 3 draws from {0, 1, 2},
    # K = 0..6 with counts 1, 3, 6, 7, 6, 3, 1. Sorted replicates r_0..r_26; quantile q at position 26 q:
    # 2.5 %: 0.65 -> r_0 + 0.65 (r_1 - r_0) = 0.065; 97.5 %: 25.35 -> r_25 + 0.35 (r_26 - r_25) = 0.535.
    difference = out["arm"]["difference"]
    assert difference["mean"] == pytest.approx(0.3)
    assert difference["ci"] == pytest.approx([0.065, 0.535])
    assert out["arm"]["mean"] == pytest.approx(0.5) and out["arm"]["ci"] == pytest.approx([0.265, 0.735])
    assert out["real"]["ci"] == pytest.approx([0.2, 0.2]) and "difference" not in out["real"]
    assert out["arm"]["per_seed"] == pytest.approx([1.4 / 3, 0.55])
    assert difference["n_cases"] == 3 and difference["few_cases"] and out["arm"]["few_cases"]


def test_sampled_draws_approach_exact_enumeration():
    rng = np.random.default_rng(1)
    real, arm = rng.uniform(0.3, 0.7, (3, 5)), rng.uniform(0.4, 0.9, (3, 5))
    differences = arm.mean(0) - real.mean(0)
    exact = [differences[list(draw)].mean() for draw in itertools.product(range(5), repeat=5)]  # 3125 draws
    expected = np.quantile(exact, [0.05, 0.95])
    assert resample_indices(5, 3000, 0).shape == (3000, 5)  # 5**5 > 3000: sampled
    out = paired_bootstrap({"real": real, "arm": arm}, "real", samples=3000, confidence=0.9, seed=4)
    assert out["arm"]["difference"]["ci"] == pytest.approx(expected, abs=0.01)
    enumerated = paired_bootstrap({"real": real, "arm": arm}, "real", samples=3125, confidence=0.9, seed=4)
    assert enumerated["arm"]["difference"]["ci"] == pytest.approx(expected, abs=1e-12)


def test_cases_a_class_is_absent_from_are_left_out():
    real = [[0.5, NAN, 0.7, 0.6], [0.5, NAN, 0.7, NAN]]
    arm = [[0.6, NAN, NAN, 0.9], [0.8, NAN, NAN, 0.7]]  # case 1 absent everywhere, case 2 only in real
    out = paired_bootstrap({"real": real, "arm": arm}, "real", samples=100, confidence=0.95, seed=0)
    assert out["real"]["n_cases"] == 3 and out["real"]["mean"] == pytest.approx((0.5 + 0.7 + 0.6) / 3)
    assert out["arm"]["n_cases"] == 2 and out["arm"]["mean"] == pytest.approx((0.7 + 0.8) / 2)
    difference = out["arm"]["difference"]  # paired: cases 0 and 3 only
    assert difference["n_cases"] == 2 and difference["mean"] == pytest.approx(((0.7 - 0.5) + (0.8 - 0.6)) / 2)
    low, high = difference["ci"]
    assert 0.2 - 1e-12 <= low <= high <= 0.2 + 1e-12  # both paired differences are 0.2


def test_ratio_of_a_scaled_arm_is_exact():
    rng = np.random.default_rng(0)
    real = rng.uniform(0.5, 0.9, (2, 12))
    out = paired_bootstrap({"real": real, "synthetic": 0.9 * real}, "real", samples=500, confidence=0.95, seed=0,
                           ratio=True)
    ratio = out["synthetic"]["ratio"]
    assert ratio["value"] == pytest.approx(0.9) and ratio["ci"] == pytest.approx([0.9, 0.9])
    assert ratio["n_cases"] == 12 and not ratio["few_cases"]


def test_coverage_is_near_nominal_on_simulated_studies():
    """200 studies of 30 cases and 3 seeds: case difficulty, a case-dependent gain of the arm (mean 0.05) and
    seed noise per (seed, case). The 95 % interval of the difference must hold 0.05 in about 95 % of studies."""
    rng = np.random.default_rng(2024)
    true_difference, hits, arm_hits = 0.05, 0, 0
    for _ in range(200):
        difficulty = rng.normal(0.6, 0.1, size=30)
        gain = true_difference + rng.normal(0.0, 0.04, size=30)
        real = difficulty + rng.normal(0.0, 0.03, size=(3, 30))
        arm = difficulty + gain + rng.normal(0.0, 0.03, size=(3, 30))
        out = paired_bootstrap({"real": real, "arm": arm}, "real", samples=1000, confidence=0.95,
                               seed=int(rng.integers(1 << 31)))
        low, high = out["arm"]["difference"]["ci"]
        hits += low <= true_difference <= high
        low, high = out["arm"]["ci"]
        arm_hits += low <= 0.6 + true_difference <= high
    assert 0.90 <= hits / 200 <= 0.98
    assert 0.90 <= arm_hits / 200 <= 0.98


def test_fewer_than_ten_cases_are_flagged():
    rng = np.random.default_rng(3)
    for n_cases, flagged in ((9, True), (10, False)):
        values = rng.uniform(size=(3, n_cases))
        out = paired_bootstrap({"real": values, "arm": values + 0.1}, "real", samples=200, confidence=0.95,
                               seed=0)
        assert out["real"]["few_cases"] is flagged and out["arm"]["difference"]["few_cases"] is flagged
        assert out["arm"]["difference"]["n_cases"] == n_cases


def test_arms_on_different_cases_are_refused():
    with pytest.raises(UserError, match="different numbers of cases"):
        paired_bootstrap({"real": np.zeros((3, 4)), "arm": np.zeros((3, 5))}, "real", samples=10,
                         confidence=0.95, seed=0)
    with pytest.raises(UserError, match="reference arm"):
        paired_bootstrap({"arm": np.zeros((3, 4))}, "real", samples=10, confidence=0.95, seed=0)
