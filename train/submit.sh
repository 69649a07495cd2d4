#!/usr/bin/env bash
# Submit the whole pipeline in one command: stage 1, stage 2 once stage 1 succeeded (afterok) from stage 1's
# checkpoint, then synthesis of the held-out test cases and their evaluation once stage 2 succeeded; with
# --labels also the label-map generator once stage 1 succeeded, on stage 1's patient split.
#
#   bash train/submit.sh [--run-dir=DIR] [--labels] [SBATCH OPTIONS] [OVERRIDES] [STAGE:OVERRIDE ...]
#
#   --run-dir=DIR      where everything goes: DIR/vqgan, DIR/diffusion, DIR/test, DIR/samples, DIR/evaluation
#                      (and DIR/labels with --labels; default runs/pipeline-<date>-<time>, relative to where you submit)
#   --labels           also train the label-map generator (labels.sh, after stage 1, in parallel with stage 2)
#   --opt=value        an sbatch option for every job, e.g. --partition=gpu --account=mylab --gpus-per-node=4
#                      (the --name=value form; SBATCH_* environment variables work as well)
#   key=value          a Hydra override for every training job, e.g. dataset=duke dataset.root_dir=/data/duke
#   vqgan:X, diffusion:X, labels:X, sample:X, evaluate:X
#                      X (a Hydra override, or an sbatch option if it starts with -) for that job only,
#                      e.g. vqgan:trainer.max_steps=50000 diffusion:--time=48:00:00 sample:steps=100
#
# Prints the job ids; `squeue --me` shows them waiting on each other. A failed job cancels the ones after it.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=runs/pipeline-$(date +%Y%m%d-%H%M%S)
all_jobs=()
both_stages=()
vqgan_args=()
vqgan_sbatch=()
diffusion_args=()
diffusion_sbatch=()
with_labels=false
labels_args=()
labels_sbatch=()
sample_eval_args=()
sample_eval_sbatch=()

for arg; do
    case "$arg" in
        --run-dir=*) run_dir=${arg#--run-dir=} ;;
        --labels) with_labels=true ;;
        -*=*) all_jobs+=("$arg") ;;
        -*)
            case "$arg" in
                --requeue | --no-requeue | --exclusive | --hold | --wait | --test-only) all_jobs+=("$arg") ;;
                *)
                    echo "submit.sh: '$arg': give sbatch options as --name=value" >&2
                    exit 2
                    ;;
            esac
            ;;
        vqgan:-*) vqgan_sbatch+=("${arg#vqgan:}") ;;
        vqgan:*) vqgan_args+=("${arg#vqgan:}") ;;
        diffusion:-*) diffusion_sbatch+=("${arg#diffusion:}") ;;
        diffusion:*) diffusion_args+=("${arg#diffusion:}") ;;
        labels:-*) labels_sbatch+=("${arg#labels:}") ;;
        labels:*) labels_args+=("${arg#labels:}") ;;
        sample:-* | evaluate:-*) sample_eval_sbatch+=("${arg#*:}") ;;
        sample:* | evaluate:*) sample_eval_args+=("$arg") ;;
        *=* | ~*) both_stages+=("$arg") ;;
        *)
            echo "submit.sh: '$arg' is neither an sbatch option (--name=value) nor an override (key=value)" >&2
            exit 2
            ;;
    esac
done

if [[ " ${all_jobs[*]} " == *" --wait "* ]]; then
    echo "submit.sh: --wait would block on stage 1 before submitting the rest; wait on the last job instead" >&2
    exit 2
fi

mkdir -p logs "$run_dir"  # Slurm does not create the folder of --output=logs/...

submit() {  # submit <sbatch arguments...>: prints the job id
    local reply
    reply=$(sbatch --parsable "$@")
    echo "${reply%%;*}"  # --parsable prints "<id>[;<cluster>]"
}

vqgan_job=$(submit "${all_jobs[@]}" "${vqgan_sbatch[@]}" "$root/vqgan.sh" \
    "train.run_dir=$run_dir/vqgan" "${both_stages[@]}" "${vqgan_args[@]}")
diffusion_job=$(submit --dependency="afterok:$vqgan_job" "${all_jobs[@]}" "${diffusion_sbatch[@]}" \
    "$root/diffusion.sh" "train.run_dir=$run_dir/diffusion" "model.vqgan_ckpt=$run_dir/vqgan/last.ckpt" \
    "${both_stages[@]}" "${diffusion_args[@]}")
sample_eval_job=$(submit --dependency="afterok:$diffusion_job" "${all_jobs[@]}" "${sample_eval_sbatch[@]}" \
    "$root/train/sample_eval.sh" "$run_dir/diffusion" "$run_dir" "${sample_eval_args[@]}")

echo "run directory: $run_dir"
echo "stage 1 (vqgan):       job $vqgan_job  -> $run_dir/vqgan/last.ckpt"
echo "stage 2 (diffusion):   job $diffusion_job  (after $vqgan_job) -> $run_dir/diffusion/last.ckpt"
echo "sampling + evaluation: job $sample_eval_job  (after $diffusion_job) -> $run_dir/samples, $run_dir/evaluation"
jobs="$vqgan_job $diffusion_job $sample_eval_job"
if [[ $with_labels == true ]]; then
    labels_job=$(submit --dependency="afterok:$vqgan_job" "${all_jobs[@]}" "${labels_sbatch[@]}" "$root/labels.sh" \
        "train.run_dir=$run_dir/labels" "model.split_ckpt=$run_dir/vqgan/last.ckpt" "${both_stages[@]}" \
        "${labels_args[@]}")
    echo "label-map generator:   job $labels_job  (after $vqgan_job) -> $run_dir/labels/last.ckpt"
    jobs="$jobs $labels_job"
fi
echo "$jobs" >"$run_dir/jobs.txt"
