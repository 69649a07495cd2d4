"""Channels-last (NDHWC) storage: the layout oneDNN and cuDNN run 3D convolutions in natively."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def to_channels_last_3d(module: nn.Module) -> nn.Module:
    """Store every 5D weight channels-last (NDHWC): the layout oneDNN and cuDNN run 3D convolutions in natively,
    so fewer layout conversions (time and memory) happen per step. 2D weights are left as they are."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.dim() == 5:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)
    return module


def like_weights(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x` in the memory format of a (k x k x k) conv weight. A 1-channel input gives no format hint (its strides
    fit both layouts), so the first convolution would otherwise fall back to channels-first and every later
    channels-last layer would pay a layout copy."""
    if weight.dim() == 5 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last_3d):
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x
