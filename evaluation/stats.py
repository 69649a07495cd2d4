"""Paired percentile bootstrap over test cases, with training seeds as the inner level.

Each arm of an experiment gives an array of shape (seeds, cases) of one per-case score (e.g. the Dice of one
class), NaN where the score is undefined (the class is absent from a case and from the prediction). One bootstrap
replicate draws the cases with replacement (the same draw for every arm: the comparison is paired), averages the
seeds within each drawn case (NaN-aware) and then the drawn cases. The difference of an arm to the reference arm
is computed within each replicate over the cases where both are defined, so case-to-case variation cancels and
the seed noise of each case stays in the spread. An interval from fewer than `min_cases` cases is flagged
(`few_cases`): a percentile bootstrap over a handful of cases under-covers. With n cases and n**n <= samples, the
n**n equally likely ordered draws are enumerated exactly instead of sampled.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from utils.errors import UserError

MIN_CASES = 10


def as_seed_case_array(values, name: str = "values") -> np.ndarray:
    """float64 (seeds, cases); a 1D array is one seed."""
    array = np.asarray(values, dtype=np.float64)
    array = array[None] if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[0] == 0:
        raise UserError(f"{name}: expected an array of shape (seeds, cases), got shape {np.shape(values)}")
    return array


def seed_mean(values: np.ndarray) -> np.ndarray:
    """Per case, the mean over the seeds that define it (NaN where no seed does)."""
    defined = ~np.isnan(values)
    counts = defined.sum(axis=0)
    sums = np.where(defined, values, 0.0).sum(axis=0)
    return np.divide(sums, counts, out=np.full(values.shape[1], np.nan), where=counts > 0)


def resample_indices(n_cases: int, samples: int, seed: int) -> np.ndarray:
    """(replicates, n_cases) case indices: every ordered draw when n_cases**n_cases <= samples, else `samples`
    random draws with replacement."""
    if n_cases == 0:
        return np.zeros((0, 0), dtype=np.int64)
    if n_cases ** n_cases <= samples:
        return np.array(list(itertools.product(range(n_cases), repeat=n_cases)), dtype=np.int64)
    return np.random.default_rng(seed).integers(0, n_cases, size=(samples, n_cases))


def resampled_means(case_values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of the defined drawn cases, per replicate (NaN where a replicate drew no defined case)."""
    drawn = case_values[indices]
    defined = ~np.isnan(drawn)
    counts = defined.sum(axis=1)
    sums = np.where(defined, drawn, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(indices), np.nan), where=counts > 0)


def percentile_interval(replicates: np.ndarray, confidence: float) -> list[float]:
    """[low, high] percentiles (linear interpolation) of the defined replicates."""
    replicates = replicates[~np.isnan(replicates)]
    if replicates.size == 0:
        return [float("nan"), float("nan")]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def _summary(case_values: np.ndarray, indices: np.ndarray, confidence: float, min_cases: int) -> dict:
    n_cases = int((~np.isnan(case_values)).sum())
    mean = float(case_values[~np.isnan(case_values)].mean()) if n_cases else float("nan")
    return {"mean": mean, "ci": percentile_interval(resampled_means(case_values, indices), confidence),
            "n_cases": n_cases, "few_cases": n_cases < min_cases}


def _ratio(values: np.ndarray, reference: np.ndarray, indices: np.ndarray, confidence: float,
           min_cases: int) -> dict:
    both = ~np.isnan(values) & ~np.isnan(reference)
    values, reference = np.where(both, values, np.nan), np.where(both, reference, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(values[both].mean() / reference[both].mean()) if both.any() else float("nan")
        replicates = resampled_means(values, indices) / resampled_means(reference, indices)
    replicates[~np.isfinite(replicates)] = np.nan
    return {"value": value if np.isfinite(value) else float("nan"),
            "ci": percentile_interval(replicates, confidence), "n_cases": int(both.sum()),
            "few_cases": int(both.sum()) < min_cases}


def paired_bootstrap(arms: Mapping[str, np.ndarray], reference: str, *, samples: int, confidence: float,
                     seed: int, min_cases: int = MIN_CASES, ratio: bool = False) -> dict:
    """For every arm: its mean over cases with a percentile interval, the number of cases that define it,
    `few_cases`, the mean per seed; for every arm but `reference`, also `difference` (arm minus reference over
    the cases both define, with its interval, n_cases and few_cases) and, with `ratio`, `ratio` (mean of the arm
    / mean of the reference over the cases both define). All arms share one resampling of cases."""
    if reference not in arms:
        raise UserError(f"bootstrap: reference arm '{reference}' is not among {sorted(arms)}")
    if not 0.0 < confidence < 1.0:
        raise UserError(f"bootstrap.confidence={confidence}: expected a number in (0, 1)")
    if samples < 1:
        raise UserError(f"bootstrap.samples={samples}: expected a positive integer")
    values = {name: as_seed_case_array(v, name) for name, v in arms.items()}
    n_cases = {v.shape[1] for v in values.values()}
    if len(n_cases) != 1:
        raise UserError(f"bootstrap: the arms hold different numbers of cases {sorted(n_cases)}; they must be "
                        "scored on the same test cases")
    indices = resample_indices(n_cases.pop(), int(samples), int(seed))
    case_means = {name: seed_mean(v) for name, v in values.items()}
    out = {}
    for name, v in values.items():
        entry = _summary(case_means[name], indices, confidence, min_cases)
        entry["per_seed"] = [float(np.nanmean(row)) if (~np.isnan(row)).any() else float("nan") for row in v]
        if name != reference:
            entry["difference"] = _summary(case_means[name] - case_means[reference], indices, confidence,
                                           min_cases)
            if ratio:
                entry["ratio"] = _ratio(case_means[name], case_means[reference], indices, confidence, min_cases)
        out[name] = entry
    return out
