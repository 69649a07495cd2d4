"""Vector quantiser with an exponential-moving-average codebook (van den Oord et al. 2017, appendix; Razavi et al.
2019), initialised from the first batch of encoder outputs, with restarts of codes that are not used.

The restart rule. N latent vectors per step (summed over ranks) over K codes give each code an expected share of
N/K assignments per step; the moving-average count of a code estimates its own share. A code is dead when that
count falls below `dead_code_threshold` times N/K (0.03: used less than 3 % as often as a fair share) and it has
not been (re)started within the moving average's horizon, ceil(1 / (1 - decay)) steps (100 at decay 0.99), so its
count has had time to say whether it is used. Dead codes move to distinct current encodings (no two alike, none
equal to a code), drawn without replacement with probability proportional to their squared distance to their code
(the worst-quantised ones first, k-means++ style), and restart with a count of N/K: an unused restarted code then
needs ln(threshold) / ln(decay) steps (349 at the defaults) before it is dead again. The initial codebook counts as
a restart at step 0 and takes distinct encodings too (with a small jitter where the batch has fewer distinct
vectors than codes).

Usage is reported over a window, not per batch: `last_used` holds the step each code was last assigned, and the
usage is the fraction of codes assigned within the last `usage_window` steps (it can exceed N/K).

Everything that changes the codebook happens only in training mode with gradients enabled, and under
torch.distributed every rank calls the same collectives: the batch statistics are summed over ranks, rank 0 does
the initialisation and the restarts, and the resulting buffers are broadcast, so all ranks hold identical
codebooks. All state is in buffers and the random draws are seeded by the update count, so a resumed run
continues exactly.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NEVER = -(2**62)  # `last_used` of a code never assigned
INIT_JITTER = 0.01  # repeated initial encodings are moved by this fraction of the per-channel spread


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


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the assignment distribution given by `counts` (1 = one code, K = uniform)."""
    probs = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())


def usage_fraction(last_used: torch.Tensor, counts: torch.Tensor, step: int, window: int) -> torch.Tensor:
    """Fraction of codes assigned in this batch or within the last `window` update steps (up to `step`)."""
    return ((last_used > step - window) | (counts > 0)).float().mean()


def distinct_rows(flat: torch.Tensor, n: int, generator: torch.Generator,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Up to `n` distinct rows of `flat` (N, D), drawn without replacement, uniformly or with probability
    proportional to `weights` (N,) (rows of weight 0 are never drawn); fewer when fewer distinct rows qualify."""
    rows, inverse = torch.unique(flat, dim=0, return_inverse=True)
    if weights is None:
        w = torch.ones(rows.shape[0], dtype=torch.float64)
    else:  # equal rows have equal weights (a function of the row): any one of them stands for all
        w = torch.zeros(rows.shape[0], dtype=weights.dtype, device=weights.device)
        w = w.scatter_reduce(0, inverse, weights, reduce="amax").double().cpu()
    m = min(n, int((w > 0).sum()))
    if m == 0:
        return rows[:0]
    picks = torch.multinomial(w, m, replacement=False, generator=generator)
    return rows[picks.to(rows.device)]


class EMAVectorQuantizer(nn.Module):
    """Quantise (B, D, ...) latents to the nearest of `num_codes` codes of dimension `embedding_dim`.

    The stage-1 latent interface (shared with `fsq.FiniteScalarQuantizer` and `kl.GaussianLatent`):
    `encoder_channels` (what the encoder outputs), `latent(h) -> z` (the continuous latent stage 2 works on: here
    the encoder output itself), `quantize(z) -> (z_q, info)` and `forward(h) -> (z_q, info)` (the training path,
    here the same). z_q carries straight-through gradients to z; info holds `indices` (B, ...),
    `commitment_loss` (already multiplied by `commitment_weight`), `regularizer` ({"commitment": that loss}, what
    the generator loss adds) and `stats` (detached scalars to log: `perplexity` of this batch's assignments,
    `codebook_usage` over the window, `codes_restarted` in this call).
    """

    kind = "ema_vq"

    def __init__(
        self,
        *,
        num_codes: int,
        embedding_dim: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 0.03,
        usage_window: int = 100,
        epsilon: float = 1e-5,
        restart_seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not 0.0 <= dead_code_threshold <= 1.0:
            raise ValueError(f"dead_code_threshold is a fraction of the expected share N/K: it must be in [0, 1], "
                             f"got {dead_code_threshold}")
        if usage_window < 1:
            raise ValueError(f"usage_window must be at least 1 step, got {usage_window}")
        self.num_codes = num_codes
        self.embedding_dim = embedding_dim
        self.encoder_channels = embedding_dim
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.usage_window = usage_window
        self.grace_steps = math.ceil(1.0 / (1.0 - decay))
        self.epsilon = epsilon
        self.restart_seed = restart_seed
        self.register_buffer("embedding", torch.randn(num_codes, embedding_dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, embedding_dim))
        # Saved in every checkpoint, so a resumed run never re-initialises the codebook.
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("restarted_at", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("last_used", torch.full((num_codes,), NEVER, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the restart rule had no restart and usage steps: start them afresh.
        for name, fill in (("restarted_at", 0), ("last_used", NEVER)):
            state_dict.setdefault(prefix + name, torch.full((self.num_codes,), fill, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for an index map (B, ...) -> (B, D, ...)."""
        z_q = F.embedding(indices, self.embedding)
        return z_q.movedim(-1, 1)

    def latent(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = z.movedim(1, -1).reshape(-1, self.embedding_dim)
            update = self.training and torch.is_grad_enabled()
            if update and not bool(self.initialized):
                self._initialise(flat.detach())
            indices = nearest_codes(flat.detach(), self.embedding)
            q_flat = F.embedding(indices, self.embedding)  # a copy: the update below does not touch it
            z_q = q_flat.view(*z.movedim(1, -1).shape).movedim(-1, 1)
            counts = torch.bincount(indices, minlength=self.num_codes).to(flat.dtype)
            restarted = 0
            if update:
                counts = self._ema_update(flat.detach(), indices, counts)
                distances = (flat.detach() - q_flat).pow(2).sum(1)
                restarted = self._restart_dead_codes(flat.detach(), distances, counts)
            commitment = self.commitment_weight * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()  # straight-through estimator
            info = {
                "indices": indices.view(z.shape[0], *z.shape[2:]),
                "commitment_loss": commitment,
                "regularizer": {"commitment": commitment},
                "stats": {
                    "perplexity": perplexity(counts).detach(),
                    "codebook_usage": usage_fraction(self.last_used, counts, int(self.num_updates),
                                                     self.usage_window),
                    "codes_restarted": torch.tensor(float(restarted)),
                },
            }
        return z_q, info

    quantize = forward

    @torch.no_grad()
    def _initialise(self, flat: torch.Tensor) -> None:
        """Codebook = distinct random encoder outputs of the first batch (rank 0's, broadcast to all ranks),
        each code with a count of the expected share N/K."""
        generator = self._generator()
        rows = distinct_rows(flat, self.num_codes, generator)
        if rows.shape[0] < self.num_codes:  # fewer distinct encodings than codes: repeat them, slightly moved
            extra = rows[torch.randint(rows.shape[0], (self.num_codes - rows.shape[0],), generator=generator)
                         .to(rows.device)]
            spread = flat.std(0).clamp_min(1e-6) if flat.shape[0] > 1 else torch.ones_like(flat[0])
            noise = torch.randn(extra.shape, generator=generator).to(extra.device)
            rows = torch.cat([rows, extra + INIT_JITTER * spread * noise])
        self.embedding.copy_(rows)
        world = dist.get_world_size() if _distributed() else 1
        self.cluster_size.fill_(flat.shape[0] * world / self.num_codes)
        if _distributed():
            dist.broadcast(self.embedding, src=0)
            dist.broadcast(self.cluster_size, src=0)
        self.embed_sum.copy_(self.embedding * self.cluster_size.unsqueeze(1))
        self.restarted_at.fill_(int(self.num_updates))
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
        self.last_used[counts > 0] = int(self.num_updates)
        return counts

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, distances: torch.Tensor, counts: torch.Tensor) -> int:
        """Dead codes (see the module docstring) jump to distinct worst-quantised current encodings; returns how
        many restarted. `counts` are this step's all-ranks counts, so N/K is the same on every rank."""
        step = int(self.num_updates)
        expected = counts.sum() / self.num_codes
        dead = (self.cluster_size < self.dead_code_threshold * expected) & (
            step - self.restarted_at >= self.grace_steps)
        n_dead = int(dead.sum())
        if n_dead and _is_rank_zero():
            rows = distinct_rows(flat, n_dead, self._generator(), weights=distances)
            dead_codes = dead.nonzero().squeeze(1)
            chosen = dead_codes[self.cluster_size[dead_codes].argsort()[: rows.shape[0]]]  # least used first
            self.embedding[chosen] = rows
            self.cluster_size[chosen] = expected
            self.embed_sum[chosen] = rows * expected
            self.restarted_at[chosen] = step
        if _distributed():  # unconditionally, so every rank calls the same collectives
            for buffer in (self.embedding, self.cluster_size, self.embed_sum, self.restarted_at):
                dist.broadcast(buffer, src=0)
        return int((self.restarted_at == step).sum()) if n_dead else 0

    def _generator(self) -> torch.Generator:
        # Seeded by the update count: restarts are reproducible and continue identically after a resume.
        return torch.Generator().manual_seed(self.restart_seed * 1_000_003 + int(self.num_updates))
