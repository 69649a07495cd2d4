"""The stage-1 network: encoder -> latent (one of three kinds) -> decoder (normal, or SPADE fed the label map).

The latent kind (`quantizer`, stored in `hparams`): `ema_vq`, an EMA vector-quantised codebook (the paper's model,
`quantizer.EMAVectorQuantizer`); `fsq`, finite scalar quantisation with an implicit codebook
(`fsq.FiniteScalarQuantizer`); `kl`, a continuous Gaussian latent with a KL penalty (`kl.GaussianLatent`). All
three share the encoder, the decoders and the losses; only the encoder's output channels (twice the latent
channels for `kl`: mean and log-variance) and the regulariser the generator loss adds differ.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.build import configurable
from vq_gan_3d.fsq import FiniteScalarQuantizer
from vq_gan_3d.kl import GaussianLatent
from vq_gan_3d.networks import Decoder, DecoderMaskCompressor, Encoder
from vq_gan_3d.quantizer import EMAVectorQuantizer

KINDS = ("ema_vq", "fsq", "kl")
DEFAULT_EMBEDDING_DIM = 8
DEFAULT_FSQ_LEVELS = (8, 5, 5, 5)


def latent_kind(hparams: dict[str, Any]) -> str:
    """The latent kind of stored VQ-GAN settings (settings written before the kinds existed: ema_vq)."""
    return str(hparams.get("quantizer", "ema_vq"))


def build_quantizer(kind: str, embedding_dim: int | None, *, num_codes: int, ema_decay: float,
                    commitment_weight: float, dead_code_threshold: float, usage_window: int,
                    fsq_levels: Sequence[int], kl_weight: float) -> tuple[nn.Module, int]:
    """The latent bottleneck of `kind` (ema_vq | fsq | kl) and its latent channel count."""
    if kind not in KINDS:
        raise ValueError(f"quantizer must be one of {list(KINDS)}, got {kind!r}")
    if kind == "fsq":
        fsq_levels = [int(level) for level in fsq_levels]
        if embedding_dim is not None and embedding_dim != len(fsq_levels):
            raise ValueError(f"fsq has one latent channel per level entry: embedding_dim {embedding_dim} "
                             f"!= {len(fsq_levels)} entries in fsq_levels {fsq_levels}")
        return FiniteScalarQuantizer(levels=fsq_levels, usage_window=usage_window), len(fsq_levels)
    embedding_dim = DEFAULT_EMBEDDING_DIM if embedding_dim is None else embedding_dim
    if kind == "kl":
        return GaussianLatent(embedding_dim=embedding_dim, kl_weight=kl_weight), embedding_dim
    return EMAVectorQuantizer(num_codes=num_codes, embedding_dim=embedding_dim, decay=ema_decay,
                              commitment_weight=commitment_weight, dead_code_threshold=dead_code_threshold,
                              usage_window=usage_window), embedding_dim


@configurable()
class VQGAN(nn.Module):
    """`encode(image) -> z` (the continuous latent before quantisation, what stage 2 diffuses: the encoder output
    for ema_vq, its bounded value for fsq, the posterior mean for kl), `quantize(z) -> (z_q, info)` (nearest code,
    rounding, or the identity), `decode(z, label=None) -> image` (quantises first; the SPADE decoder needs `label`),
    `forward(image, label=None) -> (recon, info)` (the training path: for kl a reparameterised sample). `info`
    holds `regularizer` (weighted loss terms the generator loss adds: commitment for ema_vq, KL for kl, none for
    fsq) and `stats` (detached scalars to log).

    Images are (B, 1, X, Y, Z) in [-1, 1]; labels are int class maps (B, 1, X, Y, Z) in [0, label_nc).
    Built from `model.vqgan` (`utils.build.build`); `hparams` is the constructor's arguments with the target
    (`utils.build.configurable`), what checkpoints store to rebuild the network. Each latent kind reads its own
    arguments: ema_vq `num_codes`, `ema_decay`, `commitment_weight`, `dead_code_threshold`, `usage_window`; fsq
    `fsq_levels` (one per latent channel: `embedding_dim`, if given, must be their number), `usage_window`; kl
    `kl_weight`. `embedding_dim=None`: 8 for ema_vq and kl. `label_nc=None`: a plain decoder; a class count: the
    SPADE decoder fed the label map.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        base_channels: int = 16,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int | Sequence[int] = 1,
        downsample: Sequence[int] = (4, 4, 4),
        quantizer: str = "ema_vq",
        embedding_dim: int | None = None,
        num_codes: int = 16384,
        norm_groups: int = 8,
        ema_decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 0.03,
        usage_window: int = 100,
        fsq_levels: Sequence[int] = DEFAULT_FSQ_LEVELS,
        kl_weight: float = 1e-6,
        label_nc: int | None = None,
        spade_hidden: int = 32,
        spade_kernel_size: int = 3,
        mask_compressor_channels: int = 0,
        mask_compressor_hidden: int = 16,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.quantizer, embedding_dim = build_quantizer(
            quantizer, embedding_dim, num_codes=num_codes, ema_decay=ema_decay, commitment_weight=commitment_weight,
            dead_code_threshold=dead_code_threshold, usage_window=usage_window, fsq_levels=fsq_levels,
            kl_weight=kl_weight)
        self.embedding_dim = embedding_dim
        shape = dict(base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                     downsample=downsample, norm_groups=norm_groups, gradient_checkpointing=gradient_checkpointing)
        self.label_nc = label_nc
        self.downsample = tuple(int(f) for f in downsample)
        self.encoder = Encoder(in_channels=in_channels, embedding_dim=self.quantizer.encoder_channels, **shape)
        label_channels = None
        self.mask_compressor = None
        if label_nc is not None:
            label_channels = label_nc
            if mask_compressor_channels > 0:
                self.mask_compressor = DecoderMaskCompressor(label_nc=label_nc,
                                                             out_channels=mask_compressor_channels,
                                                             hidden_channels=mask_compressor_hidden)
                label_channels = mask_compressor_channels
        self.decoder = Decoder(out_channels=in_channels, label_channels=label_channels, spade_hidden=spade_hidden,
                               spade_kernel_size=spade_kernel_size,
                               embedding_dim=embedding_dim, **shape)

    @property
    def kind(self) -> str:
        """The latent kind: ema_vq, fsq or kl."""
        return latent_kind(self.hparams)

    @property
    def is_spade(self) -> bool:
        return self.label_nc is not None

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """(X, Y, Z) of an image -> (embedding_dim, X/fx, Y/fy, Z/fz) of its latent."""
        for size, factor in zip(image_shape, self.downsample):
            if size % factor:
                raise ValueError(f"image size {list(image_shape)} is not divisible by downsample {list(self.downsample)}")
        return (self.embedding_dim, *(s // f for s, f in zip(image_shape, self.downsample)))

    def label_features(self, label: torch.Tensor) -> torch.Tensor:
        """Int label map (B, 1, ...) -> one-hot (B, label_nc, ...) -> compressed map when a compressor is set."""
        if label.dim() == 5:
            label = label[:, 0]
        onehot = F.one_hot(label.long(), self.label_nc).movedim(-1, 1).float()
        return self.mask_compressor(onehot) if self.mask_compressor is not None else onehot

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.quantizer.latent(self.encoder(image))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.quantizer.quantize(z)

    def decode_quantized(self, z_q: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_spade:
            if label is None:
                raise ValueError("this VQ-GAN has a SPADE decoder: decode() needs the label map")
            return self.decoder(z_q, self.label_features(label))
        return self.decoder(z_q)

    def decode(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        z_q, _ = self.quantize(z)
        return self.decode_quantized(z_q, label)

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        z_q, info = self.quantizer(self.encoder(image))
        return self.decode_quantized(z_q, label), info
