# Sourced by vqgan.sh, diffusion.sh and labels.sh (not run on its own): start one training stage, under Slurm through srun
# (one task per GPU, Lightning reads its ranks from Slurm), elsewhere as a plain python process.
#
#   launch_stage <python module> [hydra overrides...]
#
# Under Slurm, unless the overrides already set them:
#   train.run_dir      runs/<train.name>-<job id>: a requeued job keeps its job id, so it finds its own last.ckpt
#   trainer.devices    tasks per node (--ntasks-per-node), which Lightning requires to equal devices
#   trainer.num_nodes  nodes of the allocation (--nodes)
# OMP_NUM_THREADS follows --cpus-per-task. $PYTHON selects the interpreter (default: python on PATH).

_has_override() {  # _has_override <key> <overrides...>: true when an override sets <key>
    local key=$1 arg
    shift
    for arg in "$@"; do
        case "$arg" in
            "$key="* | "+$key="* | "++$key="*) return 0 ;;
        esac
    done
    return 1
}

launch_stage() {
    local module=$1
    shift
    local python=${PYTHON:-python}
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    # Run from the submission directory (runs/ and logs/ land there) but import the project from its root.
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        exec "$python" -m "$module" "$@"
    fi

    local overrides=("$@")
    local job_id=${SLURM_JOB_ID}
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
        job_id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    fi
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local tasks_per_node=${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-1} / nodes))}
    _has_override train.run_dir "$@" || overrides+=("train.run_dir=runs/\${train.name}-${job_id}")
    _has_override trainer.devices "$@" || overrides+=("trainer.devices=${tasks_per_node}")
    _has_override trainer.num_nodes "$@" || overrides+=("trainer.num_nodes=${nodes}")

    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    # srun (Slurm >= 22.05) no longer inherits --cpus-per-task from the batch job; hand it over explicitly.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK}
    fi
    echo "[launch] job ${job_id} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
        "${nodes} node(s) x ${tasks_per_node} task(s), ${OMP_NUM_THREADS} CPU(s) per task"
    echo "[launch] ${python} -m ${module} ${overrides[*]}"

    # srun runs in the background so that this shell can pass on a USR1 sent to it alone
    # (`scancel --batch --signal=USR1 <job>`); `--signal=USR1@90` reaches the tasks directly.
    srun --kill-on-bad-exit=1 "$python" -m "$module" "${overrides[@]}" &
    local srun_pid=$!
    trap 'kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
    local status=0
    while true; do
        status=0
        wait "$srun_pid" || status=$?
        # wait also returns when a trapped signal arrives; keep waiting while srun is alive.
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    trap - USR1
    return "$status"
}
