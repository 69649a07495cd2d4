#!/usr/bin/env bash
# The label-map generator on the demo data, after `bash demo.sh` (it reuses runs/vqgan-demo for the patient split,
# runs/diffusion-demo for the scans and the demo's real-trained segmenter): train the generator (experiment=demo,
# sized for about 10 minutes on a 2-core CPU), generate pairs with attributes drawn from the training maps and a
# lesion-volume sweep, evaluate the maps (attribute fidelity, plausibility, class volumes, novelty) and the scans
# (the segmenter's Dice on the generated pairs vs on the real test scans), and draw assets/generated.png.
#   bash scripts/labels_demo.sh [Hydra overrides of the generator's training]
# Writes runs/labels-demo (checkpoints) and runs/labels-demo-eval/{pairs,sweep,eval-pairs,eval-sweep,segmentation}.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export PYTHON=${PYTHON:-$PWD/.venv/bin/python}
python=$PYTHON
ckpt=runs/diffusion-demo/last.ckpt
segmenter=runs/demo-eval/segmentation/segmenter.pt
for needed in runs/vqgan-demo/last.ckpt "$ckpt" "$segmenter" runs/demo-eval/train/labels; do
    if [[ ! -e $needed ]]; then
        echo "error: run 'bash demo.sh' first ($needed is missing)" >&2
        exit 2
    fi
done
bash labels.sh experiment=demo model.split_ckpt=runs/vqgan-demo/last.ckpt "$@"
labels=runs/labels-demo/last.ckpt
out=runs/labels-demo-eval
scans=(image_sampler.sampler=dpmpp_2m image_sampler.steps=25 window=whole overwrite=true)  # as demo.sh samples
"$python" -m ddpm.generate "labels_ckpt=$labels" "ckpt=$ckpt" "n=${N_PAIRS:-20}" "out=$out/pairs" "${scans[@]}"
# the demo's training lesions total 1.8 to 29 mL; the other attributes of pair k come from one training case
"$python" -m ddpm.generate "labels_ckpt=$labels" "ckpt=$ckpt" "n=${N_PER_VOLUME:-5}" "out=$out/sweep" \
    "sweep={lesion_volume_ml:${SWEEP_ML:-[2,4,8,16,24]}}" "${scans[@]}"
for set in pairs sweep; do
    "$python" -m evaluation.labelmaps dataset=demo real=runs/demo-eval/train/labels "fake=$out/$set/labels" \
        "requested=$out/$set/attributes.csv" "out=$out/eval-$set" overwrite=true
done
"$python" -m evaluation.segmentation dataset=demo "out=$out/segmentation" overwrite=true \
    split_file=runs/diffusion-demo/split.json "segmenter_weights=$segmenter" "generated=$out/pairs"
"$python" -m benchmarks.make_generated_figure --pairs "$out/pairs" --sweep "$out/sweep" --out assets/generated.png \
    --overwrite
echo "done: generator in runs/labels-demo, pairs and their evaluation in $out, figure assets/generated.png"
