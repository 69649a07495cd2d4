#!/usr/bin/env bash
# Stage 1, the 3D VQ-GAN.
#   sbatch vqgan.sh dataset=duke dataset.root_dir=/data/duke           (Slurm; overrides go to Hydra unchanged)
#   bash vqgan.sh experiment=demo                                      (this machine, no Slurm)
# The #SBATCH lines below are defaults for one GPU; options on the sbatch command line win over them, e.g.
#   sbatch -p PARTITION -A ACCOUNT --gpus-per-node=4 --ntasks-per-node=4 --nodes=2 vqgan.sh ...
#   sbatch --gpus-per-node=0 --cpus-per-task=2 --mem=8G vqgan.sh ...   (CPU-only partition)
# See docs/cluster.md. Create logs/ in the directory you submit from (Slurm does not create it).
#SBATCH --job-name=vqgan
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@90
#SBATCH --requeue
set -euo pipefail

# Under sbatch this file runs from a copy in Slurm's spool directory: the job record names the original.
here=$(dirname "${BASH_SOURCE[0]}")
[[ -f $here/train/launch.sh || -z ${SLURM_JOB_ID:-} ]] ||
    here=$(dirname "$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.* Command=\([^ ]*\).*/\1/p')")
# shellcheck source=train/launch.sh
source "$here/train/launch.sh"
launch_stage train.train_vqgan "$@"
