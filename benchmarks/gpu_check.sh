#!/usr/bin/env bash
# The CUDA check, in at most 10 minutes on a GPU machine:
#   bash benchmarks/gpu_check.sh
# 1. an interpreter with CUDA torch: $PYTHON if set, else .venv or .venv-gpu if its torch sees the GPU, else
#    .venv-gpu built by scripts/install.sh with TORCH_SPEC (default: the CUDA 12.4 wheels; needs the internet);
# 2. the test suite's GPU cases (pytest -m gpu: bf16 training steps, torch.compile, NCCL DDP, CUDA vs CPU);
# 3. the three benchmarks with --device cuda at the paper settings (bench_fullvolume: one 512x512x512 volume);
# 4. a short demo.sh on CUDA (50 training steps per stage) in a scratch copy of the project (runs/ is untouched).
# Each piece has a timeout (the pieces share a 570 s budget) and is reported as timed out when it runs past it.
# Writes one JSON of figures: $OUT/gpu_check.json if OUT is set, else runs/gpu_check.json; logs beside it in
# gpu_check_logs/. Without a CUDA GPU (none listed by nvidia-smi, or CUDA_VISIBLE_DEVICES empty) it says so in
# one line and exits 0; otherwise it exits 1 when any piece failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

gpu_count() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} && ( -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1 ) ]]; then
        echo 0
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        find /proc/driver/nvidia/gpus -mindepth 1 -maxdepth 1 2>/dev/null | wc -l
    fi
}
if (( $(gpu_count) == 0 )); then
    echo "gpu_check: no CUDA GPU on this machine; nothing to check"
    exit 0
fi

out_dir=${OUT:-$root/runs}
logs=$out_dir/gpu_check_logs
rm -rf "$logs"
mkdir -p "$logs"
pieces=$logs/pieces.tsv
: >"$pieces"
started=$(date +%s)
budget=570

# run_piece NAME SECONDS COMMAND...: COMMAND under a timeout of SECONDS (less if the budget is nearly spent),
# output in $logs/NAME.log, and NAME, exit status, seconds taken and timeout appended to pieces.tsv.
run_piece() {
    local name=$1 want=$2 left begin rc
    shift 2
    left=$(( budget - ($(date +%s) - started) ))
    (( want > left )) && want=$left
    if (( want < 5 )); then
        printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 0 >>"$pieces"
        echo "gpu_check: $name skipped (the 10-minute budget is spent)"
        return
    fi
    begin=$(date +%s)
    timeout --kill-after=10 "$want" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - begin ))" "$want" >>"$pieces"
    echo "gpu_check: $name exit $rc after $(( $(date +%s) - begin )) s (timeout $want s; log $logs/$name.log)"
}

has_cuda_torch() {
    [[ -x $1 ]] && "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

python=${PYTHON:-}
if [[ -z $python ]]; then
    for venv in .venv .venv-gpu; do
        if has_cuda_torch "$root/$venv/bin/python"; then
            python=$root/$venv/bin/python
            break
        fi
    done
fi
if [[ -z $python ]]; then
    echo "gpu_check: no virtual environment with CUDA torch; installing one into .venv-gpu"
    run_piece install 300 env VENV=.venv-gpu \
        TORCH_SPEC="${TORCH_SPEC:-torch --index-url https://download.pytorch.org/whl/cu124}" bash scripts/install.sh
    has_cuda_torch "$root/.venv-gpu/bin/python" && python=$root/.venv-gpu/bin/python
fi
if [[ -z $python ]] || ! has_cuda_torch "$python"; then
    detail=""
    [[ -f $logs/install.log ]] && detail=" (the install's log: $logs/install.log)"
    echo "gpu_check: FAILED: no Python with CUDA torch$detail; on a machine without internet set PYTHON to an" \
         "interpreter with CUDA torch and requirements.txt" >&2
    python3 - "$pieces" "$out_dir/gpu_check.json" "${python:-none}" <<'EOF'
import json, os, sys
pieces, path, python = sys.argv[1:]
rows = [line.split("\t") for line in open(pieces).read().splitlines()]
report = {"ok": False, "error": f"no Python with CUDA torch ({python})", "pieces": {r[0]: {"exit": r[1]} for r in rows}}
with open(path + ".tmp", "w") as handle:
    json.dump(report, handle, indent=2)
os.replace(path + ".tmp", path)
EOF
    exit 1
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: using $python"

run_piece tests 100 "$python" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$logs/tests.xml"
run_piece bench_vqgan 50 "$python" -m benchmarks.bench_vqgan --config paper --device cuda --steps 3
run_piece bench_diffusion 120 "$python" -m benchmarks.bench_diffusion --config paper --device cuda --steps 3 \
    --timeout 25 --out "$logs/bench_diffusion.json"
run_piece bench_fullvolume 100 "$python" -m benchmarks.bench_fullvolume --config paper --device cuda --steps 2 \
    --inplane 512 --slices 512 --whole-up-to 0 --no-ct --timeout 40 --out "$logs/bench_fullvolume.json"

# The demo in a scratch copy whose .venv is the interpreter's environment; pip may not reach an index.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
venv_dir=$(dirname "$(dirname "$python")")
if [[ -f $venv_dir/pyvenv.cfg ]]; then
    tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./.venv-gpu --exclude=./runs --exclude=./.cache \
        -cf - . | tar -C "$scratch" -xf -
    ln -s "$venv_dir" "$scratch/.venv"
    run_piece demo 240 env PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 XDG_CACHE_HOME="$scratch/.cache" \
        bash "$scratch/demo.sh" trainer.accelerator=gpu trainer.precision=bf16-mixed trainer.max_steps=50 \
        trainer.val_check_interval=50
    cp "$scratch/runs/demo-eval/evaluation/metrics.json" "$logs/demo_metrics.json" 2>/dev/null
else
    printf '%s\t%s\t%s\t%s\n' demo skipped 0 0 >>"$pieces"
    echo "gpu_check: demo skipped ($python is not in a virtual environment, which demo.sh needs as .venv)"
fi

"$python" - "$logs" "$out_dir/gpu_check.json" "$(( $(date +%s) - started ))" <<'EOF'
"""Gather the pieces' figures into one JSON (written atomically)."""
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

logs, path, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def json_lines(log: Path) -> list:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]


def read_json(file: Path):
    return json.loads(file.read_text()) if file.exists() else None


pieces = {}
for name, status, taken, timeout in (line.split("\t") for line in (logs / "pieces.tsv").read_text().splitlines()):
    entry = {"exit": None if status == "skipped" else int(status), "seconds": int(taken), "timeout_s": int(timeout)}
    entry["timed_out"] = entry["exit"] in (124, 137)
    if status == "skipped":
        entry["skipped"] = True
    log = logs / f"{name}.log"
    if log.exists() and entry["exit"] != 0:
        entry["log_tail"] = log.read_text(errors="replace").splitlines()[-5:]
    pieces[name] = entry

if (logs / "tests.xml").exists():
    cases = {}
    for case in ElementTree.parse(logs / "tests.xml").getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases[f"{case.get('classname')}::{case.get('name')}"] = outcome
    pieces["tests"]["cases"] = cases
vqgan = json_lines(logs / "bench_vqgan.log")
pieces["bench_vqgan"]["result"] = vqgan[-1] if vqgan else None
for name in ("bench_diffusion", "bench_fullvolume"):
    pieces[name]["results"] = read_json(logs / f"{name}.json")
    failed = [r["case"] for r in pieces[name]["results"] or [] if "error" in r]
    if failed:  # a case that failed or timed out in its child process; the benchmark itself exits 0
        pieces[name]["failed_cases"] = failed
metrics = read_json(logs / "demo_metrics.json")
if "demo" in pieces and metrics:
    pieces["demo"]["metrics"] = {k: v.get("value") for k, v in metrics["metrics"].items() if isinstance(v, dict)}

report = {
    "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": seconds,
    "ok": all(p["exit"] == 0 and not p.get("failed_cases") for p in pieces.values()), "pieces": pieces,
}
path.parent.mkdir(parents=True, exist_ok=True)
tmp = path.with_name(f".{path.name}.tmp")
tmp.write_text(json.dumps(report, indent=2) + "\n")
os.replace(tmp, path)
print(f"gpu_check: {'all pieces passed' if report['ok'] else 'some pieces FAILED'} in {seconds} s -> {path}")
sys.exit(0 if report["ok"] else 1)
EOF
