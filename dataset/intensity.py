"""Intensity normalisation to [-1, 1] and back to native units.

CT: a fixed HU window mapped linearly to [-1, 1]; the same map for every volume, so outputs return to HU.
MR: per-volume robust percentiles mapped to -1 and to 1 - 2 x `headroom`; the percentiles are returned as `params`
so the map can be inverted, and a `reference` (e.g. the training-set median) stands in when a volume's own params
are unknown. The headroom keeps what is brighter than the upper percentile: hyperintense lesions are a small
share of the voxels (about 0.1 % in the demo), so they lie above the 99.5th percentile and a map that clips there
flattens them to the brightest tissue (measured on the demo: lesion-minus-white-matter contrast 0.45 in the real
scans, 0.01 in the stage-1 reconstructions, which learned from the clipped images).
Never per-crop: normalisation happens once per volume, before cropping.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from utils.errors import UserError


def _to_unit(volume: np.ndarray, low: float, high: float, top: float = 1.0) -> np.ndarray:
    """low -> -1, high -> top (<= 1), clipped to [-1, 1]."""
    scale = np.float32((top + 1.0) / (high - low))
    scaled = (np.asarray(volume, dtype=np.float32) - np.float32(low)) * scale - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32, copy=False)


def _from_unit(normalised, low: float, high: float, top: float = 1.0):
    clipped = normalised.clip(-1.0, 1.0)
    return (clipped + 1.0) * ((high - low) / (top + 1.0)) + low


class CTWindowNormalizer:
    """HU in [hu_min, hu_max] -> [-1, 1] (values outside the window are clipped)."""

    kind = "ct_window"

    def __init__(self, *, hu_min: float, hu_max: float):
        if not hu_max > hu_min:
            raise UserError(f"dataset.intensity: hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)

    @property
    def reference(self) -> dict:
        return {"kind": self.kind, "low": self.hu_min, "high": self.hu_max}

    @reference.setter
    def reference(self, params: Mapping | None) -> None:  # the window is fixed; nothing to set
        pass

    def forward(self, volume: np.ndarray) -> tuple[np.ndarray, dict]:
        return _to_unit(volume, self.hu_min, self.hu_max), dict(self.reference)

    def inverse(self, normalised, params: Mapping | None = None):
        """Back to HU; accepts numpy arrays and torch tensors."""
        return _from_unit(normalised, self.hu_min, self.hu_max)


class PercentileNormalizer:
    """Per volume: the `lower` and `upper` percentiles (of all voxels) -> -1 and 1 - 2 x `headroom`, clipped to
    [-1, 1]: values up to 1 / (1 - headroom) times the percentile span above the lower percentile are kept."""

    kind = "percentile"

    def __init__(self, *, lower: float, upper: float, headroom: float = 0.0, reference: Mapping | None = None):
        if not 0.0 <= lower < upper <= 100.0:
            raise UserError(f"dataset.intensity: need 0 <= lower < upper <= 100 percentiles, got {lower}, {upper}")
        if not 0.0 <= headroom < 0.5:
            raise UserError(f"dataset.intensity.headroom: need 0 <= headroom < 0.5, got {headroom}")
        self.lower, self.upper, self.headroom = float(lower), float(upper), float(headroom)
        self.top = 1.0 - 2.0 * self.headroom
        self._reference = dict(reference) if reference is not None else None

    @property
    def reference(self) -> dict | None:
        return self._reference

    @reference.setter
    def reference(self, params: Mapping | None) -> None:
        self._reference = None if params is None else _checked_params(params)

    def params_of(self, volume: np.ndarray) -> dict:
        values = np.asarray(volume, dtype=np.float32)
        low, high = (float(v) for v in np.percentile(values, [self.lower, self.upper]))
        if not high > low:  # e.g. mostly empty volume: fall back to the full range
            low, high = float(values.min()), float(values.max())
        if not high > low:
            raise ValueError("cannot normalise a constant volume")
        return {"kind": self.kind, "low": low, "high": high}

    def forward(self, volume: np.ndarray) -> tuple[np.ndarray, dict]:
        params = self.params_of(volume)
        return _to_unit(volume, params["low"], params["high"], self.top), params

    def inverse(self, normalised, params: Mapping | None = None):
        """Back to the volume's native units with its own `params`, else with `reference`."""
        params = params if params is not None else self._reference
        if params is None:
            raise ValueError("PercentileNormalizer.inverse needs params or a reference (set normalizer.reference)")
        params = _checked_params(params)
        return _from_unit(normalised, params["low"], params["high"], self.top)


def _checked_params(params: Mapping) -> dict:
    if "low" not in params or "high" not in params or not float(params["high"]) > float(params["low"]):
        raise ValueError(f"intensity params need low < high, got {dict(params)}")
    return {"kind": params.get("kind", "percentile"), "low": float(params["low"]), "high": float(params["high"])}


NORMALIZER_KEYS = {"ct_window": ("hu_min", "hu_max"), "percentile": ("lower", "upper")}
OPTIONAL_KEYS = {"ct_window": (), "percentile": ("headroom",)}  # absent in older checkpoints: 0


def build_normalizer(intensity_cfg: Mapping):
    """`cfg.dataset.intensity` -> normalizer with `forward(volume) -> (normalised, params)` and
    `inverse(normalised, params=None)`."""
    kind = intensity_cfg.get("kind")
    if kind not in NORMALIZER_KEYS:
        raise UserError(f"dataset.intensity.kind: unknown normalisation {kind!r} (use ct_window or percentile)")
    expected = NORMALIZER_KEYS[kind]
    missing = [key for key in expected if key not in intensity_cfg]
    unused = sorted(set(intensity_cfg) - {"kind", *expected, *OPTIONAL_KEYS[kind]})
    if missing or unused:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"not used: {', '.join(unused)} (drop with ~dataset.intensity.KEY)"] if unused else [])
        raise UserError(f"dataset.intensity: kind {kind} needs exactly the keys {', '.join(expected)}; "
                        f"{'; '.join(problems)}; presets: dataset/intensity=ct_window or dataset/intensity=percentile")
    if kind == CTWindowNormalizer.kind:
        return CTWindowNormalizer(hu_min=float(intensity_cfg["hu_min"]), hu_max=float(intensity_cfg["hu_max"]))
    return PercentileNormalizer(lower=float(intensity_cfg["lower"]), upper=float(intensity_cfg["upper"]),
                                headroom=float(intensity_cfg.get("headroom", 0.0)))


def reference_params(all_params: list[Mapping]) -> dict:
    """Median of per-volume params: the stand-in for volumes whose own params are unknown (generated ones)."""
    if not all_params:
        raise ValueError("reference_params needs at least one volume's params")
    lows = [float(p["low"]) for p in all_params]
    highs = [float(p["high"]) for p in all_params]
    return {"kind": all_params[0].get("kind", "percentile"), "low": float(np.median(lows)),
            "high": float(np.median(highs))}
