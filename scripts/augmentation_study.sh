#!/usr/bin/env bash
# The augmentation study on the demo, from the trained demo models of `bash demo.sh` (runs/diffusion-demo):
#   export the training and test label maps of the run's split -> edit the training label maps (random lesion
#   insert / move / grow / shrink with anatomical checks) -> synthesise scans from the training, edited and test
#   label maps -> python -m evaluation.augmentation (regimes of 4, 8 and all real cases x arms x 3 seeds).
#   bash scripts/augmentation_study.sh [OVERRIDE ...]
# Extra arguments are Hydra overrides of evaluation.augmentation (config/augmentation.yaml), e.g.
# `segmenter.train.max_steps=600 "seeds=[0,1,2,3,4]"`. RUN_DIR and OUT_DIR (environment) change the trained run
# and the output folder (default runs/diffusion-demo, runs/augmentation-demo). Long: 27 segmenters are trained;
# use a GPU machine when there is one. Results: $OUT_DIR/study/augmentation.{json,csv,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
run_dir=${RUN_DIR:-runs/diffusion-demo}
out=${OUT_DIR:-runs/augmentation-demo}
ckpt=$run_dir/last.ckpt
split=$run_dir/split.json
if [[ ! -f $ckpt || ! -f $split ]]; then
    echo "error: run 'bash demo.sh' first ($ckpt and $split are missing)" >&2
    exit 2
fi
sample=(sampler=dpmpp_2m steps=25 overwrite=true)

# label maps of the run's own split (links): the test cases never train anything
"$python" -m train.export_split "run_dir=$run_dir" "out=$out/train" split=train overwrite=true
"$python" -m train.export_split "run_dir=$run_dir" "out=$out/test" split=test overwrite=true
# edited copies of the training label maps only (<case>_edit<j>.nii.gz, edits.json)
"$python" -m evaluation.augmentation action=edit_maps dataset=demo "split_file=$split" \
    "edit.labels=$out/train/labels" "edit.out=$out/edited-labels" overwrite=true
# synthetic scans <label map>_syn0.nii.gz of the training, edited and test label maps
"$python" -m ddpm.sample "ckpt=$ckpt" "labels=$out/train/labels" "out=$out/samples-train" "${sample[@]}"
"$python" -m ddpm.sample "ckpt=$ckpt" "labels=$out/edited-labels" "out=$out/samples-edited" "${sample[@]}"
"$python" -m ddpm.sample "ckpt=$ckpt" "labels=$out/test/labels" "out=$out/samples-test" "${sample[@]}"
"$python" -m evaluation.augmentation dataset=demo "split_file=$split" "out=$out/study" overwrite=true \
    "synthetic.train=$out/samples-train" "synthetic.edited_labels=$out/edited-labels" \
    "synthetic.edited=$out/samples-edited" "synthetic.test=$out/samples-test" "$@"
echo "done: $out/study/augmentation.json, augmentation.csv, augmentation.png"
