"""Stage 1: the 3D VQ-GAN (encoder, latent of one of three kinds: EMA vector quantiser, finite scalar quantiser or
KL-regularised Gaussian, normal or SPADE decoder), its losses, checkpoint loading
and the encode / reconstruct command-line tools. Contracts: docs/ARCHITECTURE.md. Submodules are imported
explicitly (`from vq_gan_3d.checkpoint import load_vqgan`)."""
