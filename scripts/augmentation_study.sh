#!/usr/bin/env bash
# The augmentation study on the demo, from the trained demo models of `bash demo.sh` (runs/diffusion-demo):
#   export the training and test label maps of the run's split -> edit the training label maps (random lesion
#   insert / move / grow / shrink with anatomical checks) -> synthesise scans from the training, edited and test
#   label maps -> (with a trained label-map generator) generate new (scan, label map) pairs -> python -m
#   evaluation.augmentation (regimes of 4, 8 and all real cases x arms x 3 seeds).
#   bash scripts/augmentation_study.sh [OVERRIDE ...]
# Extra arguments are Hydra overrides of evaluation.augmentation (config/augmentation.yaml, the segmenter in
# config/segmenter/default.yaml), e.g. `segmenter.train.max_steps=600 "seeds=[0,1,2,3,4]"`. Environment: RUN_DIR
# (default runs/diffusion-demo), OUT_DIR (runs/augmentation-demo), LABELS_CKPT (runs/labels-demo/last.ckpt, from
# `bash labels.sh experiment=demo model.split_ckpt=runs/vqgan-demo/last.ckpt`; without it the real+generated arm
# is reported as skipped) and N_GENERATED (36 generated pairs). Long: 27 segmenters (36 with generated pairs);
# use a GPU machine when there is one. Results: $OUT_DIR/study/augmentation.{json,csv,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
run_dir=${RUN_DIR:-runs/diffusion-demo}
out=${OUT_DIR:-runs/augmentation-demo}
labels_ckpt=${LABELS_CKPT:-runs/labels-demo/last.ckpt}
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
# new (scan, label map) pairs gen<kkkk> from the label-map generator, when one is trained
generated=()
if [[ -f $labels_ckpt ]]; then
    "$python" -m ddpm.generate "labels_ckpt=$labels_ckpt" "ckpt=$ckpt" "n=${N_GENERATED:-36}" "out=$out/generated" \
        image_sampler.sampler=dpmpp_2m image_sampler.steps=25 overwrite=true
    generated=("synthetic.generated_labels=$out/generated/labels" "synthetic.generated=$out/generated/images")
else
    echo "note: no label-map generator at $labels_ckpt; the real+generated arm is skipped" >&2
fi
"$python" -m evaluation.augmentation dataset=demo "split_file=$split" "out=$out/study" overwrite=true \
    "synthetic.train=$out/samples-train" "synthetic.edited_labels=$out/edited-labels" \
    "synthetic.edited=$out/samples-edited" "synthetic.test=$out/samples-test" "${generated[@]}" "$@"
echo "done: $out/study/augmentation.json, augmentation.csv, augmentation.png"
