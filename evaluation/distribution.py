"""Distribution metrics of the evaluate tool: feature collection for real and synthetic sets, then Fréchet
distance and MMD per feature network, each reported with its settings or as skipped with a reason."""
from __future__ import annotations

import numpy as np
import torch

from evaluation import metrics
from evaluation.features import (
    InceptionSliceFeatures,
    LpipsModel,
    MedicalNetFeatures,
    SegmenterFeatures,
    WeightsUnavailable,
    volume_slices,
)
from evaluation.report import skipped
from evaluation.volumes import AXIS_NAMES, to_unit_range

# metric -> the feature network it needs
FEATURE_METRICS = {
    "fid_2d": "inception", "mmd_2d": "inception",
    "fid_3d_medicalnet": "medicalnet", "mmd_3d_medicalnet": "medicalnet",
    "fid_3d_segmenter": "segmenter", "mmd_3d_segmenter": "segmenter",
}


class FeatureBank:
    """Builds the feature networks the requested metrics need (recording why one is unavailable) and collects
    features of real and synthetic volumes."""

    def __init__(self, cfg, requested: list[str], *, device: torch.device, window):
        self.window = window
        self.slices_per_axis = cfg.inception.slices_per_axis
        self.unavailable: dict[str, str] = {}
        self.networks: dict[str, object] = {}
        needed = {FEATURE_METRICS[m] for m in requested if m in FEATURE_METRICS}
        builders = {
            "inception": lambda: InceptionSliceFeatures(cfg.inception.weights, device=device,
                                                        batch_size=cfg.inception.batch_size),
            "medicalnet": lambda: MedicalNetFeatures(cfg.medicalnet.weights, depth=cfg.medicalnet.depth,
                                                     device=device),
            "segmenter": lambda: SegmenterFeatures(cfg.segmenter.weights, device=device, domain=cfg.domain),
        }
        if "lpips" in requested:
            needed.add("lpips")
            builders["lpips"] = lambda: LpipsModel(cfg.lpips.weights, device=device,
                                                   batch_size=cfg.inception.batch_size)
        for name in sorted(needed):
            try:
                self.networks[name] = builders[name]()
            except WeightsUnavailable as err:
                self.unavailable[name] = str(err)
        self.features = {role: {name: [] for name in self.networks if name != "lpips"} for role in ("real", "fake")}

    def uses_2d(self) -> bool:
        return "inception" in self.networks or "lpips" in self.networks

    def slices(self, volume: np.ndarray) -> list[torch.Tensor]:
        """Per axis, the sampled slices mapped to [-1, 1]."""
        unit = to_unit_range(volume, self.window)
        return [volume_slices(unit, axis, self.slices_per_axis) for axis in range(3)]

    def add(self, role: str, volume: np.ndarray, affine: np.ndarray, slices: list[torch.Tensor] | None) -> None:
        bank = self.features[role]
        if "inception" in self.networks:
            bank["inception"].append([self.networks["inception"](s) for s in slices])
        if "medicalnet" in self.networks:
            bank["medicalnet"].append(self.networks["medicalnet"](volume))
        if "segmenter" in self.networks:
            bank["segmenter"].append(self.networks["segmenter"](volume, affine))

    def lpips(self, real_slices: list[torch.Tensor], fake_slices: list[torch.Tensor]) -> float:
        model = self.networks["lpips"]
        return float(np.mean(np.concatenate([model(r, f) for r, f in zip(real_slices, fake_slices)])))

    def results(self, requested: list[str], bandwidth) -> dict:
        out = {}
        for metric in requested:
            if metric not in FEATURE_METRICS:
                continue
            network = FEATURE_METRICS[metric]
            if network in self.unavailable:
                out[metric] = skipped(self.unavailable[network])
                continue
            real, fake = self.features["real"][network], self.features["fake"][network]
            if len(real) < 2 or len(fake) < 2:
                out[metric] = skipped(f"needs at least 2 real and 2 synthetic volumes (got {len(real)}, {len(fake)})")
                continue
            out[metric] = self._fid(network, real, fake) if metric.startswith("fid") else \
                self._mmd(network, real, fake, bandwidth)
        return out

    def _settings(self, network: str) -> dict:
        if network == "inception":
            return {"network": "Inception-v3 pool (2048-d)", "weights": str(self.networks[network].path),
                    "slices_per_axis": self.slices_per_axis, "input": "slice mapped to [-1, 1], resized to 299",
                    "window": self.window}
        if network == "medicalnet":
            return {"network": "MedicalNet 3D ResNet, global average pool", "input": "per-volume z-score"}
        return {"network": "encoder of the real-data segmenter, global averages of every level",
                "input": "resampled and normalised as in the segmenter's training"}

    def _fid(self, network: str, real: list, fake: list) -> dict:
        if network == "inception":
            per_axis = {}
            for axis, name in enumerate(AXIS_NAMES):
                r = np.concatenate([case[axis] for case in real])
                f = np.concatenate([case[axis] for case in fake])
                per_axis[name] = metrics.frechet_distance_from_features(r, f)
            return {"value": float(np.mean(list(per_axis.values()))), "per_axis": per_axis,
                    "n_real_slices": int(sum(len(c[0]) + len(c[1]) + len(c[2]) for c in real)),
                    "n_fake_slices": int(sum(len(c[0]) + len(c[1]) + len(c[2]) for c in fake)),
                    "settings": self._settings(network)}
        value = metrics.frechet_distance_from_features(np.stack(real), np.stack(fake))
        return {"value": value, "n_real": len(real), "n_fake": len(fake), "settings": self._settings(network)}

    def _mmd(self, network: str, real: list, fake: list, bandwidth) -> dict:
        if network == "inception":
            r = np.concatenate([np.concatenate(case) for case in real])
            f = np.concatenate([np.concatenate(case) for case in fake])
        else:
            r, f = np.stack(real), np.stack(fake)
        width = metrics.median_bandwidth(r, f) if bandwidth == "median" else float(bandwidth)
        settings = dict(self._settings(network), kernel="gaussian exp(-d^2 / (2 bandwidth^2))",
                        bandwidth=width, bandwidth_rule=str(bandwidth), estimator="unbiased MMD^2")
        return {"value": metrics.mmd_squared(r, f, bandwidth=width), "n_real": len(r), "n_fake": len(f),
                "settings": settings}
