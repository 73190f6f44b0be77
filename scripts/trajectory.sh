#!/usr/bin/env bash
# Regenerates tests/data/trajectory/reference.jsonl, the PyTorch trajectory tests/trajectory.rs
# compares our training with: vox2vec-train runs the configuration of
# tests/data/trajectory/args.txt on the CTs of cts.txt (under ../shared/data or $VOX2VEC_DATA)
# and dumps its initial weights and every batch; dev/trajectory.py trains PyTorch's
# reference step (fp32, CPU) from those weights on those batches and writes its losses,
# gradient norms and learning signal per step, in float32 and in float64; the step-by-step
# comparison with our run is printed.
# Needs torch and numpy ($PYTHON, default python3). Run it again after any change that moves
# the batches (sampler, augmentations, preprocessing) or the initialisation.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
data=${VOX2VEC_DATA:-../shared/data}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|^|$data/|" tests/data/trajectory/cts.txt > "$tmp/cts.txt"
mapfile -t args < tests/data/trajectory/args.txt
cargo build --release --bin vox2vec-train
./target/release/vox2vec-train "$tmp/cts.txt" "${args[@]}" --cache "$tmp/cache" --out "$tmp/run" --dump-batches "$tmp/dump"
arg() { awk -v k="$1" 'prev == k { print; exit } { prev = $0 }' tests/data/trajectory/args.txt; }
model=(--base-channels "$(arg --base-channels)" --num-scales "$(arg --num-scales)" --proj-dim "$(arg --proj-dim)" --lr "$(arg --lr)")
"$python" dev/trajectory.py "$tmp/dump" "${model[@]}" --out tests/data/trajectory/reference.jsonl --compare "$tmp/run/metrics.jsonl"
# The test's yardstick, how far fp32 runs drift apart by rounding alone: PyTorch on one thread
# (other summation orders) and in float64 (the rounding-free trajectory).
"$python" dev/trajectory.py "$tmp/dump" "${model[@]}" --threads 1 --out tests/data/trajectory/reference_1thread.jsonl > /dev/null
"$python" dev/trajectory.py "$tmp/dump" "${model[@]}" --double --out tests/data/trajectory/reference_fp64.jsonl > /dev/null
echo "wrote tests/data/trajectory/reference.jsonl, reference_1thread.jsonl and reference_fp64.jsonl"
