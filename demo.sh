#!/usr/bin/env bash
# The whole pipeline on the embedded demo data, on this machine (a 2-core CPU is enough):
#   install -> build + check the demo data -> stage 1 -> stage 2 -> synthesise the held-out test label maps
#   -> evaluate -> segmentation-based mask fidelity -> memorisation audit.
# Everything is written under runs/. Re-running resumes the training runs and regenerates the rest.
# Extra arguments are Hydra overrides for both training stages, e.g. `bash demo.sh trainer.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
export PYTHON="$PWD/.venv/bin/python"

python -m dataset.check dataset=demo
bash vqgan.sh experiment=demo "$@"
bash diffusion.sh experiment=demo "$@"
# The demo images are MR, whose units are arbitrary per scan (each subject has its own gain): metrics compare
# each volume scaled by its own percentiles (domain=percentile, data range 2).
# The demo's latents (17x20x16) are denoised and decoded whole, in one window (sample:window=whole): three times
# faster on the CPU than the default windows of the training crop's latent, with the same figures (README).
bash train/sample_eval.sh runs/diffusion-demo runs/demo-eval sample:sampler=dpmpp_2m sample:steps=25 \
    sample:window=whole sample:preview=true evaluate:domain=percentile
# Mask fidelity: a segmenter trained on the real training scans, Dice on real vs synthetic test scans. (Does
# synthetic data help a segmenter? That is the longer study: bash scripts/augmentation_study.sh.)
python -m evaluation.segmentation dataset=demo out=runs/demo-eval/segmentation overwrite=true \
    split_file=runs/diffusion-demo/split.json synthetic=runs/demo-eval/samples
python -m train.export_split run_dir=runs/diffusion-demo out=runs/demo-eval/train split=train overwrite=true
# Are the synthetic scans copies of training scans? Nearest training volume by NCC and by segmenter features; a
# scan no closer to training than the real scan of its own label map is not a copy (real=).
python -m evaluation.memorization train=runs/demo-eval/train/images fake=runs/demo-eval/samples \
    real=runs/demo-eval/test/images out=runs/demo-eval/memorization overwrite=true features=segmenter \
    segmenter_weights=runs/demo-eval/segmentation/segmenter.pt
echo "done: checkpoints in runs/vqgan-demo and runs/diffusion-demo, samples and metrics in runs/demo-eval"
