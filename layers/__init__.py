"""Layers and tensor-layout helpers shared by both stages (`vq_gan_3d` and `ddpm` import them from here, never
from each other): `norm` (GroupNorm helper, SPADE), `strides` (per-axis down-sampling steps), `memory_format`
(channels-last weights and inputs) and `tiling` (overlapping tiles and their blending weights)."""
