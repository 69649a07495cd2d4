#!/usr/bin/env bash
# Regenerate the README figures in assets/ from a finished `bash demo.sh` (runs/diffusion-demo, runs/demo-eval):
# the synthesis GIF (label, real, synthetic) and the denoising progression of one held-out test case, and the
# counterfactual figure (edited label map, inpainted scan).
#   bash scripts/demo_assets.sh [TEST_CASE_FILE_NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
ckpt=runs/diffusion-demo/last.ckpt
test_dir=runs/demo-eval/test
if [[ ! -f $ckpt || ! -d $test_dir/labels ]]; then
    echo "error: run 'bash demo.sh' first ($ckpt and $test_dir/labels are missing)" >&2
    exit 2
fi
case=${1:-$(ls "$test_dir/labels" | head -n 1)}
stem=${case%.gz}
stem=${stem%.nii}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$python" -m ddpm.sample "ckpt=$ckpt" "labels=$test_dir/labels/$case" "real=$test_dir/images/$case" "out=$tmp" \
    sampler=dpmpp_2m steps=25 preview=true save_progress=true
cp "$tmp/${stem}_syn0.gif" assets/demo_synthesis.gif
cp "$tmp/${stem}_syn0_progress.png" assets/demo_progress.png
# the demo lesion borders grey matter and CSF: it must stay inside the brain (classes 1-3), off the background
"$python" -m benchmarks.make_counterfactual_figure --ckpt "$ckpt" --host-classes 1 2 3 --forbidden-classes 0 \
    --out assets/counterfactual.png --overwrite
echo "assets/demo_synthesis.gif assets/demo_progress.png assets/counterfactual.png"
