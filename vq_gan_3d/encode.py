"""Encode a data set with a trained stage 1, so stage 2 can train on stored latents:

    python -m vq_gan_3d.encode ckpt=runs/vqgan-demo/last.ckpt dataset=demo [out_dir=DIR] [splits=[train,val]]

Each case's whole preprocessed volume (model grid, normalised, padded at the end of each axis to a multiple of the
down-sampling factor with the background value) becomes `<out_dir>/<split>/<case_id>.npz` holding `latent`
(float32, embedding_dim x X/fx x Y/fy x Z/fz, the continuous encoder output before quantisation, as
`VQGAN.encode` gives it), `label` (the label map on the same padded grid) and `pads`. `<out_dir>/latent_stats.json`
records the latents' scale statistics over the training split (mean, std, `scale_factor` = 1/std, per channel too)
and what produced them.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from dataset.cache import load_preprocessed
from dataset.crops import IMAGE_PAD_VALUE, LABEL_PAD_VALUE, pad_to_multiple
from dataset.datamodule import split_cases
from utils.atomic import atomic_path
from utils.errors import UserError, exit_on_user_error
from vq_gan_3d.checkpoint import load_vqgan

SPLITS = ("train", "val", "test")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name}: no CUDA device is available")
    return torch.device(name)


class RunningStats:
    """Per-channel count, sum and sum of squares in float64."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = np.zeros(channels)
        self.sum_sq = np.zeros(channels)

    def add(self, latent: np.ndarray) -> None:
        flat = latent.reshape(latent.shape[0], -1).astype(np.float64)
        self.count += flat.shape[1]
        self.sum += flat.sum(1)
        self.sum_sq += (flat**2).sum(1)

    def summary(self) -> dict:
        if self.count == 0:
            raise UserError("splits: no training case was encoded, so there are no scale statistics")
        mean_c = self.sum / self.count
        std_c = np.sqrt(np.maximum(self.sum_sq / self.count - mean_c**2, 0.0))
        mean = float(self.sum.sum() / (self.count * len(self.sum)))
        std = float(np.sqrt(max(self.sum_sq.sum() / (self.count * len(self.sum)) - mean**2, 0.0)))
        return {"values_per_channel": self.count, "mean": mean, "std": std,
                "scale_factor": 1.0 / std if std > 0 else None,
                "channel_mean": mean_c.tolist(), "channel_std": std_c.tolist()}


@torch.no_grad()
def encode_volume(model, image: np.ndarray, device: torch.device) -> tuple[np.ndarray, tuple]:
    """Whole (X, Y, Z) normalised volume -> (latent (D, x, y, z), pads)."""
    padded, pads = pad_to_multiple(np.asarray(image, dtype=np.float32), model.downsample, IMAGE_PAD_VALUE)
    latent = model.encode(torch.from_numpy(np.ascontiguousarray(padded))[None, None].to(device))
    return latent[0].float().cpu().numpy(), pads


def encode_dataset(cfg: DictConfig) -> Path:
    splits = [str(s) for s in cfg.splits]
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise UserError(f"splits: choose from {list(SPLITS)}, got {splits}")
    if "train" not in splits:
        raise UserError("splits: must include train (the scale statistics come from the training split)")
    ckpt = Path(str(cfg.ckpt))
    device = resolve_device(str(cfg.device))
    model = load_vqgan(ckpt, map_location=device)
    out_dir = Path(str(cfg.out_dir)) if cfg.out_dir else ckpt.parent / "latents"
    cases = split_cases(cfg.dataset)
    stats = RunningStats(model.hparams["embedding_dim"])
    written = {}
    for split in splits:
        for case in cases[split]:
            pre = load_preprocessed(case, cfg.dataset)
            latent, pads = encode_volume(model, pre.image, device)
            label, _ = pad_to_multiple(np.asarray(pre.label), model.downsample, LABEL_PAD_VALUE)
            path = out_dir / split / f"{case.case_id}.npz"
            with atomic_path(path, overwrite=bool(cfg.overwrite)) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, latent=latent, label=label, pads=np.asarray(pads, dtype=np.int64))
            if split == "train":
                stats.add(latent)
            written[case.case_id] = split
            print(f"{split}/{case.case_id}: latent {list(latent.shape)}", flush=True)
    record = {"checkpoint": ckpt.name, "dataset": str(cfg.dataset.name), "downsample": list(model.downsample),
              "latent": "continuous encoder output before quantisation (VQGAN.encode)",
              "statistics_of": "train", **stats.summary(), "cases": written}
    with atomic_path(out_dir / "latent_stats.json", overwrite=bool(cfg.overwrite)) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    print(f"wrote {len(written)} latents and latent_stats.json to {out_dir}", flush=True)
    return out_dir


@hydra.main(version_base="1.3", config_path="../config", config_name="encode")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    encode_dataset(cfg)


if __name__ == "__main__":
    main()
