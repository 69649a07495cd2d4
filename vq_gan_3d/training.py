"""One stage-1 training iteration as a plain function, shared by the LightningModule and the benchmark so both
run (and measure) the same code.

Order, chosen for memory: one forward (autoencoder, losses, and the discriminators once on [real; fake]); the
discriminator loss back-propagates first, into the discriminators' weights only, keeping the graph; the generator
loss then back-propagates into the autoencoder only and frees the graph as it goes; then both optimisers step.
The discriminator weights do not change before the generator backward has used them, and both losses see the
same discriminator and the same fakes, exactly as in the usual alternating update.

Under torch.distributed the gradients of each backward are averaged over ranks here (`average_gradients`), not by
DDP's reducer: the reducer expects every parameter to receive a gradient in each backward, and these two
backward passes each reach only their own networks.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from vq_gan_3d.losses import VQGANLoss
from vq_gan_3d.model import VQGAN

def average_gradients(params: list[nn.Parameter]) -> None:
    """Mean of each gradient over all ranks (one all-reduce of the flattened gradients); no-op on one process.
    Every rank calls it with the same parameters, which hold gradients on every rank alike."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def set_malloc_mmap_threshold(mib: int = 4) -> bool:
    """Serve host allocations of `mib` MiB and more by mmap, so freed activations go back to the OS at once.

    glibc raises its mmap threshold dynamically up to 32 MiB, after which the many 1-32 MiB activation buffers of
    a CPU training step live in the heap and fragment it: peak RSS then runs 0.2-0.5 GiB above the memory actually
    in use. Fixing the threshold keeps RSS near the live size; the cost is a page fault per fresh page of a large
    buffer (a few percent of a step). Returns False where glibc is not the C library (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mib) << 20))
    except (OSError, AttributeError, TypeError):
        return False


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """Clip by global norm when max_norm > 0 (done by hand: Lightning does not clip under manual optimisation)."""
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


class StageTimer:
    """Wall-clock seconds per phase of an iteration (synchronising CUDA first), for the benchmark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        now = self._now()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def training_iteration(
    *,
    vqgan: VQGAN,
    loss: VQGANLoss,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    image: torch.Tensor,
    label: torch.Tensor | None,
    step: int,
    generator: torch.Generator,
    grad_clip: float,
    timer: StageTimer | None = None,
    lesion_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One generator update and, once the GAN is on, one discriminator update. Returns detached values to log.

    Timer phases: `generator` (forward, generator backward and step) and `discriminator` (its backward and step).
    """
    mark = timer.mark if timer is not None else (lambda phase: None)
    recon, info = vqgan(image, label if vqgan.is_spade else None)
    g_total, terms, passes = loss.generator_loss(image, recon, info["regularizer"], step, generator,
                                                 lesion_mask=lesion_mask)
    mark("generator")
    logs = {f"train/{k}": v.detach() for k, v in terms.items()}
    disc_params = [p for d in loss.discriminators() for p in d.parameters()]
    if passes is not None:
        d_total, d_terms = loss.discriminator_loss(passes)
        del passes
        opt_d.zero_grad(set_to_none=True)
        d_total.backward(inputs=disc_params, retain_graph=True)
        logs.update({f"train/{k}": v.detach() for k, v in d_terms.items()})
        logs["train/d_loss"] = d_total.detach()
        mark("discriminator")
    gen_params = [p for p in vqgan.parameters() if p.requires_grad]
    opt_g.zero_grad(set_to_none=True)
    g_total.backward(inputs=gen_params)
    average_gradients(gen_params)
    clip_gradients(gen_params, grad_clip)
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)  # gradients are not needed until the next backward: free them now
    mark("generator")
    if "train/d_loss" in logs:
        average_gradients(disc_params)
        clip_gradients(disc_params, grad_clip)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        mark("discriminator")
    logs["train/g_loss"] = g_total.detach()
    logs.update({f"train/{k}": v for k, v in info["stats"].items()})  # the latent kind's statistics
    return logs
