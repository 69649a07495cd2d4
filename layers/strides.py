"""Per-axis down-sampling: a factor of 4 on X and Y but 2 on Z is two halvings of X and Y and one of Z."""
from __future__ import annotations

import math
from typing import Sequence


def per_level_strides(downsample: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split per-axis down-sampling factors (powers of two) into one stride triple per halving step.

    (4, 4, 2) -> [(2, 2, 2), (2, 2, 1)]: every axis halves at the first log2(factor) steps.
    """
    if len(downsample) != 3:
        raise ValueError(f"downsample needs one factor per axis (X, Y, Z), got {list(downsample)}")
    steps = []
    for factor in downsample:
        factor = int(factor)
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"downsample factors must be powers of two, got {list(downsample)}")
        steps.append(int(math.log2(factor)))
    n_levels = max(steps)
    return [tuple(2 if level < s else 1 for s in steps) for level in range(n_levels)]
