"""Label map (any grid) -> synthetic volume on exactly that grid, in native units.

`Synthesizer` wraps a loaded stage-2 model with the data settings stored in its checkpoint:
1. `prepare`: check the label values, bring the map to the model grid (RAS, training spacing; nearest
   neighbour), pad it at the far end of each axis to what the stage-1 factor and the UNet levels need;
2. `check_fits`: estimate the memory the synthesis needs and refuse, with a window or size that would fit, when
   the device does not have it;
3. `sample`: latent diffusion sample, decoded by the stage-1 decoder, padding removed (model grid). The UNet runs
   on overlapping windows of `window` latent voxels blended at every step, and the decoder on tiles of the same
   size (`ddpm.windowed`), so memory depends on the window, not on the volume; a window covering the latent is
   the plain whole-volume synthesis. With `init` (a real scan on the same grid) and `strength` < 1 sampling
   starts from that scan's latent part-noised (SDEdit) instead of pure noise;
4. `to_native`: back onto the label map's own grid and affine, intensities mapped to native units (HU for CT,
   with the training set's reference params for MR).
"""
from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dataset.crops import IMAGE_PAD_VALUE, pad_to_multiple, unpad
from dataset.geometry import GridInfo, from_model_grid, to_model_grid
from dataset.intensity import build_normalizer
from ddpm.latent_diffusion import LatentDiffusion
from ddpm.samplers import SamplerSettings, StepCallback, gaussian, partial_start, run_sampler
from ddpm.windowed import checkpoint_window, unet_window_denoiser
from layers.tiling import TileGrid, decode_tiled, encode_tiled
from utils.errors import UserError

AFFINE_TOLERANCE_MM = 1e-3

GIB = 1024**3


@dataclass
class PreparedLabel:
    name: str
    label: np.ndarray  # model grid, padded, int64
    grid_info: GridInfo
    pads: tuple

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return tuple(self.grid_info.model_shape)


def integer_labels(array: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
        raise UserError(f"{name}: not a label map (non-integer values)")
    return array.astype(np.int64)


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's free memory, or the system's available memory capped by the
    process's address-space limit (prlimit/ulimit -v) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        with open("/proc/self/statm") as handle:
            used = int(handle.read().split()[0]) * resource.getpagesize()
        headroom = max(0, limit - used)
        available = headroom if available is None else min(available, headroom)
    return available if available is not None else 2**62


def estimate_bytes(model: LatentDiffusion, image_shape, guidance_scale: float) -> int:
    """Rough upper estimate of the extra memory (float32) one synthesis needs: UNet skips and working tensors
    at every level, the cached SPADE maps, the label features, and the stage-1 decoder at full resolution."""
    unet = model.unet
    h = unet.hparams
    channels = [h["base_channels"] * m for m in h["channel_mult"]]
    latent = [s // f for s, f in zip(image_shape, model.vqgan.downsample)]
    voxels = [math.prod(latent) / 8**level for level in range(len(channels))]
    batch = 1 if guidance_scale == 1.0 else 2
    skips = sum(c * v * (h["num_res_blocks"] + 1) for c, v in zip(channels, voxels))
    working = max((3 + h["expansion"]) * c * v for c, v in zip(channels, voxels))
    spade = 0.0
    if h["decoder"] == "spade":
        spade = sum(2 * 2 * c * v * (h["num_res_blocks"] + 1) for c, v in zip(channels, voxels))
        spade += h["mask_channels"] * voxels[0] * 2 + h["mask_hidden_channels"] * math.prod(image_shape) / 8
    unet_bytes = 4 * batch * (skips + working + spade)
    vq = model.vqgan.hparams
    vq_channels = [vq["base_channels"] * m for m in vq["channel_mult"]]
    full = math.prod(image_shape)
    decode_bytes = 4 * max(4 * c * full / 8**level for level, c in enumerate(vq_channels))
    if model.vqgan.is_spade:
        decode_bytes += 4 * full * (vq.get("mask_compressor_channels") or vq["label_nc"]) * 2
    return int(1.5 * max(unet_bytes, decode_bytes))


def volume_bytes(model: LatentDiffusion, image_shape, on_cpu: bool) -> int:
    """Memory that grows with the volume whatever the window: the sampler's latents (current sample, prediction,
    noise, blended output, a few temporaries) and, on the CPU, the label map and the decoded image."""
    latent = model.unet.hparams["in_channels"] * math.prod(image_shape) / math.prod(model.vqgan.downsample)
    return int(4 * 8 * latent + (9 * math.prod(image_shape) if on_cpu else 0))


class Synthesizer:
    def __init__(self, model: LatentDiffusion, meta: dict[str, Any], device: torch.device,
                 memory_limit_bytes: int | None = None, *, window=None, window_overlap: float = 0.25,
                 windows_per_call: int = 1):
        if not 0 <= window_overlap < 1:
            raise UserError(f"window_overlap={window_overlap}: must be a fraction in [0, 1)")
        if windows_per_call < 1:
            raise UserError(f"window_batch={windows_per_call}: must be at least 1")
        self.window = checkpoint_window(window, model, meta)  # latent voxels
        self.window_overlap = float(window_overlap)
        self.windows_per_call = int(windows_per_call)
        self.model = model.to(device)
        self.device = device
        self.dataset = meta["dataset"]
        self.spacing = [float(s) for s in self.dataset["spacing"]]
        self.modality = str(self.dataset["modality"])
        self.normalizer = build_normalizer(self.dataset["intensity"])
        reference = meta.get("intensity_reference")
        if reference:
            self.normalizer.reference = reference
        elif self.normalizer.reference is None:
            raise UserError("checkpoint: no reference intensity params stored; cannot map MR volumes back to "
                            "native units")
        self.memory_limit_bytes = memory_limit_bytes
        # bf16 on GPUs that have it (as in training); full precision on CPU.
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    @property
    def label_nc(self) -> int:
        return self.model.label_nc

    def prepare(self, label: np.ndarray, affine: np.ndarray, name: str) -> PreparedLabel:
        label = integer_labels(np.asarray(label), name)
        values = np.unique(label)
        unknown = values[(values < 0) | (values >= self.label_nc)]
        if unknown.size:
            shown = ", ".join(str(v) for v in unknown[:8]) + (" ..." if unknown.size > 8 else "")
            raise UserError(f"{name}: label values {shown} are not classes of this model (it knows 0.."
                            f"{self.label_nc - 1})")
        model_label, grid_info = to_model_grid(label, affine, self.spacing, is_label=True)
        padded, pads = pad_to_multiple(model_label, self.model.image_multiple, 0)
        return PreparedLabel(name=name, label=padded.astype(np.int64), grid_info=grid_info, pads=pads)

    def latent_grid(self, prepared: PreparedLabel) -> TileGrid:
        latent = [s // f for s, f in zip(prepared.label.shape, self.model.vqgan.downsample)]
        return TileGrid.covering(latent, self.window, self.window_overlap, multiple=self.model.unet.required_multiple)

    def check_fits(self, prepared: PreparedLabel, guidance_scale: float) -> None:
        """Refuse, before anything runs, a synthesis whose estimated memory exceeds what the device has free:
        the networks' share depends on the window (times the windows per call), the rest on the volume."""
        shape = prepared.label.shape
        factor = self.model.vqgan.downsample
        grid = self.latent_grid(prepared)
        window_image = [w * f for w, f in zip(grid.size, factor)]
        calls = min(self.windows_per_call, len(grid))
        volume = volume_bytes(self.model, shape, self.device.type == "cpu")
        need = calls * estimate_bytes(self.model, window_image, guidance_scale) + volume
        have = available_bytes(self.device)
        if self.memory_limit_bytes is not None:
            have = min(have, self.memory_limit_bytes)
        if need <= have:
            return
        problem = (f"{prepared.name}: does not fit: {'x'.join(map(str, shape))} voxels on the model grid (spacing "
                   f"{self.spacing} mm) with windows of {'x'.join(map(str, grid.size))} latent voxels, "
                   f"{calls} per call, need about {need / GIB:.1f} GiB, {have / GIB:.1f} GiB are free on "
                   f"{self.device.type}")
        multiple = self.model.image_multiple
        if volume > have / 2:  # the whole-volume buffers alone: only a smaller volume helps
            shrink = (have / 2 / volume) ** (1 / 3)
            fits = [max(m, int(s * shrink) // m * m) for s, m in zip(shape, multiple)]
            raise UserError(f"{problem}; crop the label map to about {'x'.join(map(str, fits))} model voxels "
                            f"(multiples of {list(multiple)}) or less")
        step = self.model.unet.required_multiple
        shrink = ((have - volume) / (need - volume)) ** (1 / 3)
        smaller = [max(step, int(w * shrink) // step * step) for w in grid.size]
        raise UserError(f"{problem}; use window_batch=1 or a smaller window, e.g. window=[{','.join(map(str, smaller))}]")

    def prepare_init(self, image: np.ndarray, affine: np.ndarray, name: str, prepared: PreparedLabel) -> np.ndarray:
        """A real scan on the label map's grid -> normalised (its own intensity params) and padded like the
        label map on the model grid: the start of a partial-noise synthesis."""
        original = prepared.grid_info
        if tuple(image.shape) != tuple(original.original_shape) or not np.allclose(
                affine, original.original_affine, atol=AFFINE_TOLERANCE_MM):
            raise UserError(f"{name}: the initial image is not on the grid of label map {prepared.name} (shape "
                            f"{list(image.shape)} vs {list(original.original_shape)}, or another affine)")
        model_image = to_model_grid(image, affine, self.spacing, is_label=False)[0]
        try:
            normalised = self.normalizer.forward(model_image)[0]
        except ValueError as err:
            raise UserError(f"{name}: cannot normalise the initial image ({err})") from None
        return pad_to_multiple(normalised, self.model.image_multiple, IMAGE_PAD_VALUE)[0]

    def label_tensor(self, prepared: PreparedLabel) -> torch.Tensor:
        """The label map as a CPU tensor of the smallest type (windows are cropped from it and moved)."""
        dtype = np.uint8 if self.label_nc < 256 else np.int16
        return torch.from_numpy(prepared.label.astype(dtype))[None, None]

    @torch.no_grad()
    def sample(self, prepared: PreparedLabel, *, settings: SamplerSettings, guidance_scale: float,
               generator: torch.Generator, callback: StepCallback | None = None, init: np.ndarray | None = None,
               strength: float = 1.0) -> np.ndarray:
        """Normalised synthetic volume on the (unpadded) model grid."""
        model = self.model
        label = self.label_tensor(prepared)
        latent_shape = (model.unet.hparams["in_channels"],
                        *(s // f for s, f in zip(prepared.label.shape, model.vqgan.downsample)))
        try:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                denoise = unet_window_denoiser(model.ema_unet, label, window=self.window,
                                               overlap=self.window_overlap, guidance_scale=guidance_scale,
                                               windows_per_call=self.windows_per_call)
                x_start = gaussian((1, *latent_shape), generator=generator, device=self.device)
                if init is not None and strength < 1.0:
                    known = encode_tiled(model.encode, torch.from_numpy(init)[None, None],
                                         factor=model.vqgan.downsample, tile=self.window,
                                         overlap=self.window_overlap, device=self.device)
                    x_start = partial_start(model.schedule, known, x_start, steps=settings.steps, strength=strength)
                latent = run_sampler(settings, denoise, x_start, model.schedule, strength=strength,
                                     generator=generator, callback=callback)
                image = self.decode(latent, label)
        except (torch.cuda.OutOfMemoryError, MemoryError) as err:
            raise UserError(f"{prepared.name}: ran out of memory while synthesising "
                            f"{'x'.join(map(str, prepared.label.shape))} voxels on {self.device.type} "
                            f"({type(err).__name__}); use a smaller window=[x,y,z] or window_batch=1") from None
        return unpad(image[0, 0].numpy(), prepared.pads)

    def decode(self, latent: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The stage-1 decoder over tiles of the window's size, gathered on the CPU (float32)."""
        return decode_tiled(self.model.decode, latent, label if self.model.vqgan.is_spade else None,
                            factor=self.model.vqgan.downsample, tile=self.window, overlap=self.window_overlap,
                            out_device="cpu")

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor, prepared: PreparedLabel) -> np.ndarray:
        return unpad(self.decode(latent, self.label_tensor(prepared))[0, 0].numpy(), prepared.pads)

    def to_native(self, model_grid_image: np.ndarray, prepared: PreparedLabel) -> np.ndarray:
        """Model-grid normalised image -> the label map's original grid, native units, output dtype."""
        on_grid = from_model_grid(model_grid_image, prepared.grid_info, is_label=False)
        return self.native_units(on_grid)

    def native_units(self, normalised: np.ndarray) -> np.ndarray:
        native = np.asarray(self.normalizer.inverse(np.asarray(normalised, dtype=np.float32)))
        if self.modality == "ct":
            return np.clip(np.round(native), -32768, 32767).astype(np.int16)
        return native.astype(np.float32)
