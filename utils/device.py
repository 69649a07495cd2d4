"""`resolve_device(name)`: the one reading of a `device=` setting, shared by every CLI and evaluation tool;
`native_bf16(device)`: whether a device computes in bfloat16 natively (the `auto` precision of training)."""
from __future__ import annotations

import functools
import os

import torch

from utils.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one (with several tasks on a node, the task's own: SLURM_LOCALID or
    LOCAL_RANK modulo the GPUs it sees), else the CPU. Anything else is checked: a name torch does not know, or a
    CUDA device this machine does not have, is a one-line `UserError`."""
    name = str(name)
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = os.environ.get("SLURM_LOCALID", os.environ.get("LOCAL_RANK"))
        if local is None:
            return torch.device("cuda")
        return torch.device("cuda", int(local) % max(1, torch.cuda.device_count()))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name}: no CUDA GPU is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"device={name}: not supported (use auto, cpu, cuda or cuda:N)")
    return device


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (its first `flags` line; empty elsewhere)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """A CUDA GPU that supports bfloat16, or a CPU with bfloat16 dot-product instructions (AVX512-BF16, e.g. AMD
    Zen 4 and later, Intel Cooper Lake; AMX-BF16, Intel Sapphire Rapids and later). Other CPUs emulate bfloat16
    arithmetic, which is slower than float32 there."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in _cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)
