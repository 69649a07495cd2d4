"""Per-class logit offsets that make an argmax keep the class volumes of a set of label maps.

An autoencoder's argmax decides each voxel for the locally commonest class, so a class that is thin at the latent's
scale (a cortical ribbon next to white matter) comes back thinner: a constant offset per class (a prior shift)
moves the boundaries back to the training volumes. `ddpm.label_generator.LabelGenerator.fit_class_bias` fits them
on its decoded training maps.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

BIAS_LIMIT = 4.0  # largest offset set (logit units)


@torch.no_grad()
def fit_class_offsets(maps: Iterable[tuple[torch.Tensor, torch.Tensor]], label_nc: int, *, iterations: int = 60,
                      max_per_map: int | None = None, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, np.ndarray]:
    """(offsets (label_nc,), relative volume error per class after the fit) for `maps`, which yields (logits
    (label_nc, ...), label (...)) of one decoded map at a time.

    Offsets stay within +-BIAS_LIMIT, so only voxels whose best two logits are closer than 2 x BIAS_LIMIT can change
    class: those are kept (at most `max_per_map` of a map, a random share drawn with `generator` beyond that, each
    counted with its weight), the others counted once. Fitted by `iterations` damped steps on the log volume ratio,
    background the reference; the best offsets seen are kept (zeros with no iterations)."""
    nc = label_nc
    target = torch.zeros(nc, dtype=torch.float64)
    fixed = torch.zeros(nc, dtype=torch.float64)
    kept, weights = [], []
    for logits, label in maps:
        x = logits.detach().float().reshape(nc, -1).cpu()
        target += torch.bincount(label.flatten().long().cpu(), minlength=nc).double()
        top = x.topk(min(2, nc), dim=0).values
        open_ = (top[0] - top[-1]) < 2 * BIAS_LIMIT
        fixed += torch.bincount(x.argmax(0)[~open_], minlength=nc).double()
        choice, weight = x[:, open_].T, 1.0
        if max_per_map is not None and choice.shape[0] > max_per_map:  # a random share standing for all
            weight = choice.shape[0] / max_per_map
            choice = choice[torch.randperm(choice.shape[0], generator=generator)[:max_per_map]]
        kept.append(choice.contiguous())
        weights.append(torch.full((choice.shape[0],), weight, dtype=torch.float64))
    kept_all, weight_all = torch.cat(kept), torch.cat(weights)

    def counts(bias: torch.Tensor) -> torch.Tensor:
        return fixed + torch.bincount((kept_all + bias).argmax(1), weights=weight_all, minlength=nc)

    bias = torch.zeros(nc, dtype=torch.float32)
    made = counts(bias)
    best, best_error = bias.clone(), float((made - target).abs().sum())
    for _ in range(iterations):
        bias = bias + 0.5 * (torch.log1p(target) - torch.log1p(made)).float()
        bias = (bias - bias[0]).clamp(-BIAS_LIMIT, BIAS_LIMIT)
        made = counts(bias)
        error = float((made - target).abs().sum())
        if error < best_error:
            best, best_error = bias.clone(), error
    return best, ((counts(best) - target) / target.clamp(min=1)).numpy()
