#!/usr/bin/env bash
# Does our pretraining learn? One command: pretrain on ../shared/data/pretrain without any
# OpenKBP CT (every OpenKBP patient is probed, so none may be seen in pretraining), then probe
# OpenKBP (fold 0 of 4: 12 training, 4 validation patients) with the same seeds and budget
# from a random backbone and from the pretrained one: linear and non-linear probes, and
# fine-tuning against training from scratch. Writes OUT/report/table.md (best validation Dice
# per organ, one column per run), OUT/report/dice_vs_steps.png and OUT/report/pretraining.png
# (the pretraining loss, top-1 accuracy and similarities, with the held-out validation pairs).
#
#   scripts/does-it-learn.sh                                  # CPU scale (2 cores: ~1 h pretraining, ~1.5 h probes)
#   scripts/does-it-learn.sh --device cuda --scale reference  # the reference's sizes, on a GPU
#
# Options: --device auto|cpu|cuda (default auto), --scale cpu|reference, --out DIR (default
# runs/does-it-learn), --data DIR (default ../shared/data or $VOX2VEC_DATA), --pretrain-steps N,
# --probe-steps N. Finished stages are kept: run it again to redo only what is missing.
#
# CPU scale, and why: 3 x 3 x 3 mm (OpenKBP is stored at ~4 x 4 x 2.5 mm, so 1 x 1 x 2 would
# only interpolate; at 3 mm the spinal cord and the oesophagus still span 3-5 voxels), windows
# of 64 x 64 x 32 (19 x 19 x 10 cm of context, the reference's 13 x 13 x 6 cm and more), base
# width 8 and all 6 scales (a step costs ~1.4 s on 2 cores, so ~2,400 steps fit in an hour:
# base 16 would halve that), 2 view pairs of 256 positive voxels per step, the reference's
# optimiser (Adam 3e-4, clip 1.0), temperature and augmentations.
set -euo pipefail
cd "$(dirname "$0")/.."
device=auto scale=cpu out=runs/does-it-learn data=${VOX2VEC_DATA:-../shared/data} pretrain_steps= probe_steps=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --pretrain-steps) pretrain_steps=$2; shift 2 ;;
    --probe-steps) probe_steps=$2; shift 2 ;;
    *) echo "does-it-learn: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$scale" in
  cpu)
    spacing=3,3,3 patch=64,64,32 base=8 scales=6 pairs=2 voxels=256
    pretrain_steps=${pretrain_steps:-2400} probe_steps=${probe_steps:-300} batch=4 validate_every=50 ;;
  reference)
    spacing=1,1,2 patch=128,128,32 base=16 scales=6 pairs=10 voxels=1024
    pretrain_steps=${pretrain_steps:-100000} probe_steps=${probe_steps:-3000} batch=7 validate_every=300 ;;
  *) echo "does-it-learn: --scale cpu or reference" >&2; exit 2 ;;
esac
kbp="$data/Dataset001_OpenKBP"
[[ -d "$kbp" && -d "$data/pretrain" ]] || { echo "does-it-learn: no data at $data (set --data or VOX2VEC_DATA)" >&2; exit 1; }
cargo build --release --bins --examples
bin=./target/release
mkdir -p "$out"
common=(--device "$device" --spacing "$spacing" --patch "$patch")
model=(--base-channels "$base" --num-scales "$scales")

# 1. Pretraining without OpenKBP; fixed validation pairs from two OpenKBP patients of the
#    probe's validation fold (held out of everything that trains).
if [[ ! -f "$out/pretrain/done" ]]; then
  "$bin/vox2vec-train" "$data/pretrain" --exclude openkbp_pt_ --cache "$out/cache" "${common[@]}" "${model[@]}" \
    --pairs "$pairs" --voxels "$voxels" --steps "$pretrain_steps" --checkpoint-every 200 --loader-workers 1 \
    --val-data "$kbp/imagesTr/pt_13_0000.nii.gz" --val-every 200 --val-batches 4 --out "$out/pretrain" $([[ -f "$out/pretrain/checkpoint.safetensors" ]] && echo --resume)
  touch "$out/pretrain/done"
fi

# 2. Probes on the same split, seeds and budget.
split=(--folds 4 --fold 0 --steps "$probe_steps" --batch "$batch" --validate-every "$validate_every" --seed 0)
run() {  # name, command, args...
  local name=$1; shift
  [[ -f "$out/$name/results.json" ]] && return 0
  "$bin/vox2vec" "$@" "$kbp" "${common[@]}" "${split[@]}" --out "$out/$name.part"
  rm -rf "$out/$name"; mv "$out/$name.part" "$out/$name"
}
weights=(--weights "$out/pretrain/checkpoint.safetensors")
run linear_random probe "${model[@]}"
run linear_pretrained probe "${weights[@]}"
run nonlinear_random probe --head nonlinear "${model[@]}"
run nonlinear_pretrained probe --head nonlinear "${weights[@]}"
run scratch scratch "${model[@]}"
run finetune finetune "${weights[@]}" --unfreeze-after $((probe_steps / 3))

"$bin/examples/learning_report" "$out/report" --pretrain "$out/pretrain" \
  "linear random=$out/linear_random/results.json" "linear pretrained=$out/linear_pretrained/results.json" \
  "non-linear random=$out/nonlinear_random/results.json" "non-linear pretrained=$out/nonlinear_pretrained/results.json" \
  "from scratch=$out/scratch/results.json" "fine-tuned=$out/finetune/results.json"
