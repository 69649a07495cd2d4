"""Vector quantiser with an exponential-moving-average codebook (van den Oord et al. 2017, appendix; Razavi et al.
2019), initialised from the first batch of encoder outputs and with dead-code restarts from current encodings.

Everything that changes the codebook happens only in training mode, and under torch.distributed every rank calls
the same collectives: the batch statistics are summed over ranks, rank 0 does the initialisation and the restarts,
and the resulting codebook is broadcast, so all ranks hold identical codebooks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


def nearest_codes(flat: torch.Tensor, codebook: torch.Tensor, chunk_elements: int = 1 << 21) -> torch.Tensor:
    """Index of the nearest code for each row of `flat` (N, D) by squared distance.

    argmin ||z - e||^2 = argmin (||e||^2 - 2 z.e): one matmul of [z, 1] with [-2e, ||e||^2] (no bias broadcast),
    in row chunks so the N x K score matrix never exists at once."""
    ones = torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)
    rows_aug = torch.cat([flat, ones], dim=1)
    codes_aug = torch.cat([-2.0 * codebook, codebook.pow(2).sum(1, keepdim=True)], dim=1).t().contiguous()
    rows = max(1, chunk_elements // codebook.shape[0])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        out[start:start + rows] = (rows_aug[start:start + rows] @ codes_aug).argmin(1)
    return out


class EMAVectorQuantizer(nn.Module):
    """Quantise (B, D, ...) latents to the nearest of `num_codes` codes of dimension `embedding_dim`.

    forward(z) -> (z_q, info): z_q carries straight-through gradients to z; info holds `indices` (B, ...),
    `commitment_loss` (already multiplied by `commitment_weight`), `perplexity`, `usage` (fraction of codes used
    by this batch) and `restarted` (codes restarted in this call).
    """

    def __init__(
        self,
        *,
        num_codes: int,
        embedding_dim: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 1.0,
        epsilon: float = 1e-5,
        restart_seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_codes = num_codes
        self.embedding_dim = embedding_dim
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.epsilon = epsilon
        self.restart_seed = restart_seed
        self.register_buffer("embedding", torch.randn(num_codes, embedding_dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, embedding_dim))
        # Saved in every checkpoint, so a resumed run never re-initialises the codebook.
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for an index map (B, ...) -> (B, D, ...)."""
        z_q = F.embedding(indices, self.embedding)
        return z_q.movedim(-1, 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = z.movedim(1, -1).reshape(-1, self.embedding_dim)
            update = self.training and torch.is_grad_enabled()
            if update and not bool(self.initialized):
                self._initialise(flat.detach())
            indices = nearest_codes(flat.detach(), self.embedding)
            z_q = F.embedding(indices, self.embedding)  # a copy: the update below does not touch it
            z_q = z_q.view(*z.movedim(1, -1).shape).movedim(-1, 1)
            counts = torch.bincount(indices, minlength=self.num_codes).to(flat.dtype)
            restarted = 0
            if update:
                counts = self._ema_update(flat.detach(), indices, counts)
                restarted = self._restart_dead_codes(flat.detach())
            commitment = self.commitment_weight * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()  # straight-through estimator
            probs = counts / counts.sum().clamp_min(1.0)
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            info = {
                "indices": indices.view(z.shape[0], *z.shape[2:]),
                "commitment_loss": commitment,
                "perplexity": perplexity.detach(),
                "usage": (counts > 0).float().mean().detach(),
                "restarted": restarted,
            }
        return z_q, info

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        """Codebook = random encoder outputs of the first batch (rank 0's, broadcast to all ranks)."""
        picks = torch.randint(flat.shape[0], (self.num_codes,), generator=self._generator()).to(flat.device)
        self.embedding.copy_(flat[picks])
        if _distributed():
            dist.broadcast(self.embedding, src=0)
        self.cluster_size.fill_(self.dead_code_threshold)
        self.embed_sum.copy_(self.embedding * self.dead_code_threshold)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Moving averages of code counts and of the sum of assigned encodings; returns the (all-ranks) counts."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        # Laplace smoothing keeps unused codes from dividing by zero.
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))
        self.num_updates.add_(1)
        return counts

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Codes whose moving-average count fell below the threshold jump to random current encodings."""
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead and _is_rank_zero():
            picks = torch.randint(flat.shape[0], (n_dead,), generator=self._generator()).to(flat.device)
            self.embedding[dead] = flat[picks]
            self.cluster_size[dead] = self.dead_code_threshold
            self.embed_sum[dead] = flat[picks] * self.dead_code_threshold
        if _distributed():  # unconditionally, so every rank calls the same collectives
            for buffer in (self.embedding, self.cluster_size, self.embed_sum):
                dist.broadcast(buffer, src=0)
        return n_dead

    def _generator(self) -> torch.Generator:
        # Seeded by the update count: restarts are reproducible and continue identically after a resume.
        return torch.Generator().manual_seed(self.restart_seed * 1_000_003 + int(self.num_updates))
