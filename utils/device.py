"""`resolve_device(name)`: the one reading of a `device=` setting, shared by every CLI and evaluation tool."""
from __future__ import annotations

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
