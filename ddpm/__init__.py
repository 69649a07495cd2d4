"""Stage 2: latent semantic diffusion (UNet, schedule, samplers, the latent diffusion model, synthesis CLI)."""
