"""The intensity domain in which `evaluation.evaluate` compares volumes (`domain=native|normalized|percentile`):
the data range, the clipping to the model's window (`window=`, or the HU window of a CT stage-2 `ckpt=`), each
volume's own percentile scaling, and the low end from which SSIM measures intensities.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset.intensity import CTWindowNormalizer, PercentileNormalizer, build_normalizer
from ddpm.checkpoint import load_diffusion
from utils.errors import UserError


@dataclass
class Intensity:
    domain: str
    data_range: float
    window: tuple[float, float] | None  # native -> [-1, 1] for the 2D networks; None in the other domains
    foreground_only: bool
    percentiles: tuple[float, float] | None = None  # domain=percentile: each volume's own -> -1 and 1 - 2 headroom
    headroom: float = 0.0                             # domain=percentile: kept above the upper percentile
    clip: tuple[float, float] | None = None  # native: real and synthetic clipped to the model's window
    clip_source: str = ""  # where the clipping window came from, or why nothing is clipped

    def describe(self) -> dict:
        out = {"domain": self.domain, "data_range": self.data_range, "foreground_only": self.foreground_only}
        if self.percentiles is not None:
            out["percentiles"] = list(self.percentiles)
            out["headroom"] = self.headroom
        if self.domain == "native":
            out["clipped_to_window"] = None if self.clip is None else list(self.clip)
        return out

    def low(self, real: np.ndarray, fake: np.ndarray) -> float:
        """The low end of the data range, from which SSIM measures intensities (`metrics.ssim3d`)."""
        if self.domain in ("normalized", "percentile"):
            return -1.0
        if self.clip is not None:
            return self.clip[0]
        return float(min(np.min(real), np.min(fake)))

    def low_rule(self) -> str:
        if self.domain in ("normalized", "percentile"):
            return "-1 (the domain's low end)"
        if self.clip is not None:
            return f"{self.clip[0]:g} (the clipping window's low end)"
        return "the smaller minimum of each real/synthetic pair"

    def clipping(self) -> dict:
        return {"applied": self.clip is not None, "window": None if self.clip is None else list(self.clip),
                "source": self.clip_source}

    def prepare(self, volume: np.ndarray) -> np.ndarray:
        """A loaded volume in the domain the metrics compare: clipped to the model's window, scaled by its own
        percentiles, or unchanged."""
        if self.clip is not None:
            return np.clip(volume, *self.clip).astype(np.float32, copy=False)
        if self.percentiles is None:
            return volume
        lower, upper = self.percentiles
        normalizer = PercentileNormalizer(lower=lower, upper=upper, headroom=self.headroom)
        return normalizer.forward(volume)[0].astype(np.float32)


def model_window(cfg) -> tuple[tuple[float, float] | None, str]:
    """domain=native: the intensity window of the model behind the synthetic volumes and where it came from
    (`window=`, else the HU window of a CT stage-2 checkpoint `ckpt=`), or None and the reason."""
    if cfg.window is not None:
        window = (float(cfg.window[0]), float(cfg.window[1]))
        if not window[1] > window[0]:
            raise UserError(f"window={list(cfg.window)}: high must exceed low")
        return window, "window="
    if cfg.ckpt is None:
        return None, "no model window known (give ckpt=<stage-2 checkpoint> or window=[low,high])"
    dataset = load_diffusion(cfg.ckpt)[1]["dataset"]
    normalizer = build_normalizer(dataset["intensity"])
    if not isinstance(normalizer, CTWindowNormalizer):
        return None, f"ckpt {cfg.ckpt}: a {dataset.get('modality')} model without a fixed window ({normalizer.kind})"
    return (normalizer.hu_min, normalizer.hu_max), f"ckpt {cfg.ckpt}: dataset.intensity hu_min, hu_max"


def parse_intensity(cfg, has_labels: bool) -> Intensity:
    if cfg.domain not in ("native", "normalized", "percentile"):
        raise UserError(f"domain={cfg.domain}: use native, normalized or percentile")
    if cfg.window is not None and cfg.domain != "native":
        raise UserError(f"window: only used with domain=native (domain={cfg.domain} already is in [-1, 1])")
    window, source = model_window(cfg) if cfg.domain == "native" else (None, f"domain={cfg.domain}")
    clip = window if window is not None and cfg.clip else None
    if window is not None and not cfg.clip:
        source = "clip=false"
    data_range = cfg.data_range
    if data_range is None:
        if cfg.domain == "native" and clip is None:
            raise UserError("data_range: required for domain=native without a clipping window (ckpt= or window=), "
                            "e.g. data_range=2000 for HU in [-1000, 1000]")
        data_range = 2.0 if clip is None else clip[1] - clip[0]
    if not float(data_range) > 0:
        raise UserError(f"data_range={data_range}: must be positive")
    percentiles, headroom = None, float(cfg.headroom)
    if cfg.domain == "percentile":
        percentiles = (float(cfg.percentiles[0]), float(cfg.percentiles[1]))
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise UserError(f"percentiles={list(cfg.percentiles)}: need 0 <= lower < upper <= 100")
        if not 0 <= headroom < 0.5:
            raise UserError(f"headroom={cfg.headroom}: need 0 <= headroom < 0.5")
    if cfg.foreground_only and not has_labels:
        raise UserError("foreground_only=true needs labels=DIR (the foreground is label > 0)")
    return Intensity(cfg.domain, float(data_range), window, bool(cfg.foreground_only), percentiles, headroom, clip,
                     source)
