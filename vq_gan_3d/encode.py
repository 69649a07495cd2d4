"""Encode a data set with a trained stage 1, so stage 2 can train on stored latents:

    python -m vq_gan_3d.encode ckpt=runs/vqgan-demo/last.ckpt dataset=demo [out_dir=DIR] [splits=[train,val]]

Each case's whole preprocessed volume (model grid, normalised, padded at the end of each axis to a multiple of the
down-sampling factor with the background value) becomes `<out_dir>/<split>/<case_id>.npz` holding `latent`
(float32, embedding_dim x X/fx x Y/fy x Z/fz, the continuous latent before quantisation, as `VQGAN.encode` gives
it for the checkpoint's latent kind: the encoder output for ema_vq, its bounded value for fsq, the mean for kl),
`label` (the label map on the same padded grid) and `pads`. `<out_dir>/latents.json` records what produced them
(the latent kind too) and each case's split. The cases are split as stage 1 was trained (the split stored in
its checkpoint), and a data set other than the checkpoint's is refused. The latent scale factor is not computed
here: stage 2 fits it (`train.lit_diffusion`), the one definition of it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from dataset.cache import load_preprocessed
from dataset.crops import IMAGE_PAD_VALUE, LABEL_PAD_VALUE, pad_to_multiple
from dataset.datamodule import split_cases
from utils.atomic import atomic_path
from utils.device import resolve_device
from utils.errors import UserError, exit_on_user_error
from vq_gan_3d.checkpoint import load_vqgan_for_dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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
    ckpt = Path(str(cfg.ckpt))
    device = resolve_device(str(cfg.device))
    source = f"ckpt={ckpt}"
    model, stored_split = load_vqgan_for_dataset(ckpt, cfg.dataset, source, map_location=device)
    out_dir = Path(str(cfg.out_dir)) if cfg.out_dir else ckpt.parent / "latents"
    cases = split_cases(cfg.dataset, stored_split, source)
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
            written[case.case_id] = split
            log.info("%s/%s: latent %s", split, case.case_id, list(latent.shape))
    record = {"checkpoint": ckpt.name, "dataset": str(cfg.dataset.name), "downsample": list(model.downsample),
              "latent": "continuous latent before quantisation (VQGAN.encode)", "stage1_kind": model.kind,
              "cases": written}
    with atomic_path(out_dir / "latents.json", overwrite=bool(cfg.overwrite)) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    print(f"wrote {len(written)} latents and latents.json to {out_dir}", flush=True)
    return out_dir


@hydra.main(version_base="1.3", config_path="../config", config_name="encode")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    encode_dataset(cfg)


if __name__ == "__main__":
    main()
