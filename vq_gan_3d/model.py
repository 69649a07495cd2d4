"""The stage-1 network: encoder -> EMA vector quantiser -> decoder (normal, or SPADE fed the label map)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vq_gan_3d.networks import Decoder, Encoder, MaskCompressor
from vq_gan_3d.quantizer import EMAVectorQuantizer


class VQGAN(nn.Module):
    """`encode(image) -> z` (continuous, before quantisation), `quantize(z) -> (z_q, info)`,
    `decode(z, label=None) -> image` (quantises first; the SPADE decoder needs `label`),
    `forward(image, label=None) -> (recon, info)` (the training path).

    Images are (B, 1, X, Y, Z) in [-1, 1]; labels are int class maps (B, 1, X, Y, Z) in [0, label_nc).
    `hparams` holds everything needed to rebuild the network (it is stored in checkpoints).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        base_channels: int = 16,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int | Sequence[int] = 1,
        downsample: Sequence[int] = (4, 4, 4),
        embedding_dim: int = 8,
        num_codes: int = 16384,
        norm_groups: int = 8,
        ema_decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 1.0,
        label_nc: int | None = None,
        spade_hidden: int = 32,
        mask_compressor_channels: int = 0,
        mask_compressor_hidden: int = 16,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.hparams: dict[str, Any] = dict(
            in_channels=in_channels, base_channels=base_channels, channel_mult=[int(m) for m in channel_mult],
            num_res_blocks=num_res_blocks if isinstance(num_res_blocks, int) else [int(n) for n in num_res_blocks],
            downsample=[int(f) for f in downsample], embedding_dim=embedding_dim, num_codes=num_codes,
            norm_groups=norm_groups, ema_decay=ema_decay, commitment_weight=commitment_weight,
            dead_code_threshold=dead_code_threshold, label_nc=label_nc, spade_hidden=spade_hidden,
            mask_compressor_channels=mask_compressor_channels, mask_compressor_hidden=mask_compressor_hidden,
            gradient_checkpointing=gradient_checkpointing,
        )
        shape = dict(base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                     downsample=downsample, embedding_dim=embedding_dim, norm_groups=norm_groups,
                     gradient_checkpointing=gradient_checkpointing)
        self.label_nc = label_nc
        self.downsample = tuple(int(f) for f in downsample)
        self.encoder = Encoder(in_channels=in_channels, **shape)
        self.quantizer = EMAVectorQuantizer(num_codes=num_codes, embedding_dim=embedding_dim, decay=ema_decay,
                                            commitment_weight=commitment_weight,
                                            dead_code_threshold=dead_code_threshold)
        label_channels = None
        self.mask_compressor = None
        if label_nc is not None:
            label_channels = label_nc
            if mask_compressor_channels > 0:
                self.mask_compressor = MaskCompressor(label_nc=label_nc, out_channels=mask_compressor_channels,
                                                      hidden_channels=mask_compressor_hidden)
                label_channels = mask_compressor_channels
        self.decoder = Decoder(out_channels=in_channels, label_channels=label_channels, spade_hidden=spade_hidden,
                               **shape)

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> "VQGAN":
        return cls(**hparams)

    @property
    def is_spade(self) -> bool:
        return self.label_nc is not None

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """(X, Y, Z) of an image -> (embedding_dim, X/fx, Y/fy, Z/fz) of its latent."""
        for size, factor in zip(image_shape, self.downsample):
            if size % factor:
                raise ValueError(f"image size {list(image_shape)} is not divisible by downsample {list(self.downsample)}")
        return (self.hparams["embedding_dim"], *(s // f for s, f in zip(image_shape, self.downsample)))

    def label_features(self, label: torch.Tensor) -> torch.Tensor:
        """Int label map (B, 1, ...) -> one-hot (B, label_nc, ...) -> compressed map when a compressor is set."""
        if label.dim() == 5:
            label = label[:, 0]
        onehot = F.one_hot(label.long(), self.label_nc).movedim(-1, 1).float()
        return self.mask_compressor(onehot) if self.mask_compressor is not None else onehot

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.quantizer(z)

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
        z_q, info = self.quantize(self.encode(image))
        return self.decode_quantized(z_q, label), info
