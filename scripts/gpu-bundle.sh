#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything the GPU checks need, and gathers it in the
# git-ignored folder gpu-bundle/ for a GPU machine that has the CUDA driver but no Rust:
#   gpu-bundle/bin/gpu-tests       the GPU test binary (tests/gpu.rs)
#   gpu-bundle/bin/vox2vec-train   the trainer, for --bench and real-data runs
#   gpu-bundle/tests/data/fixtures the reference fixtures the parity test reads
#   gpu-bundle/pytorch_reference.py  PyTorch's step on the same GPU, for comparison
#   gpu-bundle/run.sh              runs the GPU tests, --bench 20 in fp32 and bf16, 5 training
#                                  steps on CT phantoms, and PyTorch's reference step at the same
#                                  size (when torch is installed)
# Binaries are stripped of debug info (the bundle must stay small enough to copy).
# The kernels are compiled by build.rs, so nvcc must be present (scripts/install-cuda.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda.sh >/dev/null
out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin" "$out/tests/data"
cargo build --release --bin vox2vec-train
gpu_test=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
[[ -x "$gpu_test" ]] || { echo "gpu-bundle: the GPU test binary was not built" >&2; exit 1; }
strip --strip-debug -o "$out/bin/gpu-tests" "$gpu_test"
strip --strip-debug -o "$out/bin/vox2vec-train" target/release/vox2vec-train
cp -r tests/data/fixtures "$out/tests/data/"
cp benches/pytorch_reference.py "$out/"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the GPU checks of vox2vec-rs on this machine (CUDA driver needed, no Rust). Results go
# to stdout and, when $OUT is set, to files in it.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
results=${OUT:-$here/results}
mkdir -p "$results"
# cuBLAS: the system's, or the one in a pip wheel (PyTorch's dependencies).
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.1[23]'; then
  for root in /usr/local/cuda /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    lib=$(find "$root" -name 'libcublas.so.1[23]*' 2>/dev/null | head -1)
    if [[ -n "$lib" ]]; then export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
  done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$results/device.txt"
status=0
bin/gpu-tests 2>&1 | tee "$results/gpu-tests.txt" || status=1
for p in fp32 bf16; do
  bin/vox2vec-train --device cuda --bench "${BENCH_STEPS:-20}" --precision "$p" 2>&1 | tee "$results/bench-$p.txt" || status=1
done
# The full pretraining loop on the GPU: generated CT phantoms through the real pipeline
# (preprocessing, sampler, loader), the reference batch, a checkpoint and metrics at the end.
# The checkpoint (about 0.6 GB with Adam's moments) stays outside the results folder.
run_dir=${TMPDIR:-/tmp}/vox2vec-train-phantoms
rm -rf "$run_dir"
bin/vox2vec-train --device cuda --steps "${TRAIN_STEPS:-5}" --out "$run_dir" 2>&1 | tee "$results/train.txt" || status=1
cp "$run_dir/metrics.jsonl" "$run_dir/loss.png" "$results/" 2>/dev/null || true
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  python3 pytorch_reference.py --device cuda --only step --size reference 2>&1 | tee "$results/pytorch-step.txt"
fi
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out" | sed 's/^/gpu-bundle: /'
echo "gpu-bundle: on a GPU machine with the CUDA driver, run:"
echo "  bash gpu-bundle/run.sh"
