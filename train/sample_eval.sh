#!/usr/bin/env bash
# Synthesise the held-out test cases of a trained stage 2 and evaluate them (the last job of train/submit.sh).
#   sbatch train/sample_eval.sh DIFFUSION_RUN_DIR OUT_DIR [sample:OVERRIDE ...] [evaluate:OVERRIDE ...]
#   bash train/sample_eval.sh DIFFUSION_RUN_DIR OUT_DIR ...                  (this machine, no Slurm)
# Writes OUT_DIR/test/{images,labels} (links to the real test cases), OUT_DIR/samples (one synthetic volume per
# label map and sample, the label maps split across the tasks) and OUT_DIR/evaluation (metrics.json, figures).
# Options on the sbatch command line win over these defaults, as for vqgan.sh (see docs/cluster.md).
#SBATCH --job-name=sample-eval
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: sample_eval.sh DIFFUSION_RUN_DIR OUT_DIR [sample:OVERRIDE ...] [evaluate:OVERRIDE ...]" >&2
    exit 2
fi
run_dir=$1
out_dir=$2
shift 2
sample_overrides=()
evaluate_overrides=()
for arg; do
    case "$arg" in
        sample:*) sample_overrides+=("${arg#sample:}") ;;
        evaluate:*) evaluate_overrides+=("${arg#evaluate:}") ;;
        *)
            echo "sample_eval.sh: '$arg': prefix overrides with sample: or evaluate:" >&2
            exit 2
            ;;
    esac
done

# Under sbatch this file runs from a copy in Slurm's spool directory: the job record names the original.
here=$(dirname "${BASH_SOURCE[0]}")
[[ -f $here/launch.sh || -z ${SLURM_JOB_ID:-} ]] ||
    here=$(dirname "$(scontrol show job -o "$SLURM_JOB_ID" | sed -n 's/.* Command=\([^ ]*\).*/\1/p')")
root=$(cd "$here/.." && pwd)
if [[ ! -f $root/train/launch.sh ]]; then
    echo "error: cannot find the project (train/launch.sh) from $here; submit from the project directory" >&2
    exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}

run_tasks=()  # sampling: one task per GPU under Slurm, each taking its share of the label maps
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK}
    fi
    run_tasks=(srun --kill-on-bad-exit=1)
fi

checkpoint=$run_dir/last.ckpt
"$python" -m train.export_split "run_dir=$run_dir" "out=$out_dir/test" overwrite=true
# overwrite=true: a rerun of this job (requeue after a node failure) regenerates its own outputs.
"${run_tasks[@]}" "$python" -m ddpm.sample "ckpt=$checkpoint" "labels=$out_dir/test/labels" \
    "out=$out_dir/samples" overwrite=true "${sample_overrides[@]}"
"$python" -m evaluation.evaluate "real=$out_dir/test/images" "fake=$out_dir/samples" "ckpt=$checkpoint" \
    "labels=$out_dir/test/labels" "out=$out_dir/evaluation" overwrite=true "${evaluate_overrides[@]}"
