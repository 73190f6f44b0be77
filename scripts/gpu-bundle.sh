#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything the GPU checks need, and gathers it in the
# git-ignored folder gpu-bundle/ for a GPU machine that has the CUDA driver but no Rust:
#   gpu-bundle/bin/gpu-tests       the GPU test binary (tests/gpu.rs)
#   gpu-bundle/bin/vox2vec-train   the trainer, for --bench and real-data runs
#   gpu-bundle/bin/vox2vec         the tools, for bench-infer (patches/s of the eval pyramid)
#   gpu-bundle/bin/kernel_lab      the kernel lab (examples/kernel_lab.rs): each kernel version
#                                  validated and timed with TFLOP/s, GB/s and % of floor
#   gpu-bundle/tests/data/fixtures the reference fixtures the parity test reads
#   gpu-bundle/pytorch_reference.py  PyTorch's step on the same GPU, for comparison
#   gpu-bundle/run.sh              runs the layout probe, the GPU tests, --bench-plan and
#                                  --bench 20 in bf16 and fp32, compute-sanitizer, 5 training
#                                  steps on CT phantoms, and PyTorch's reference step at the same
#                                  size (when torch is installed); `run.sh probe bench` runs some
# Binaries are stripped of debug info (the bundle must stay small enough to copy).
# The kernels are compiled by build.rs, so nvcc must be present (scripts/install-cuda.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda.sh >/dev/null
out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/bin" "$out/tests/data"
cargo build --release --bin vox2vec-train --bin vox2vec --example kernel_lab
gpu_test=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
[[ -x "$gpu_test" ]] || { echo "gpu-bundle: the GPU test binary was not built" >&2; exit 1; }
strip --strip-debug -o "$out/bin/gpu-tests" "$gpu_test"
strip --strip-debug -o "$out/bin/vox2vec-train" target/release/vox2vec-train
strip --strip-debug -o "$out/bin/vox2vec" target/release/vox2vec
strip --strip-debug -o "$out/bin/kernel_lab" target/release/examples/kernel_lab
cp -r tests/data/fixtures "$out/tests/data/"
cp benches/pytorch_reference.py "$out/"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the GPU checks of vox2vec-rs on this machine (CUDA driver needed, no Rust). Results go
# to stdout and, when $OUT is set, to files in it. Phases, in order of what they decide
# (each under its own time limit, so that one hang cannot eat a short device lease; the
# limits add up to 8 minutes):
#   probe     the mma/ldmatrix fragment-layout probe (if it fails, every tensor-core result does)
#   tests     every GPU test against the CPU oracle (bin/gpu-tests)
#   bench     --bench-plan and --bench N in bf16 and fp32 (measured ms beside the plan's floor)
#   infer     bench-infer: patches/s of the eval pyramid at 1 and 8 windows, fp32 and bf16,
#             and PyTorch's at the same sizes when torch with CUDA is installed
#   lab       the kernel lab: every version of each hot kernel, checked and timed
#   sanitize  compute-sanitizer memcheck (exact-size allocations), racecheck and synccheck
#             on the per-op GPU tests
#   train     5 pretraining steps on CT phantoms through the real pipeline
#   nccl      3 steps as a one-rank NCCL group (RANK=0 WORLD_SIZE=1): the data-parallel path,
#             its rendezvous and the gradient all-reduce on the device (libnccl.so from the
#             system, or PyTorch's nvidia-nccl package linked into a temporary folder)
#   pytorch   PyTorch's step at the same size, when torch with CUDA is installed
#   bash run.sh                 # all phases
#   bash run.sh probe bench     # some
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
results=${OUT:-$here/results}
mkdir -p "$results"
phases=("$@")
[[ ${#phases[@]} -gt 0 ]] || phases=(probe tests bench infer lab sanitize train pytorch)
want() { [[ " ${phases[*]} " == *" $1 "* ]]; }
# cuBLAS: the system's, or the one in a pip wheel (PyTorch's dependencies).
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.1[23]'; then
  for root in /usr/local/cuda /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    lib=$(find "$root" -name 'libcublas.so.1[23]*' 2>/dev/null | head -1)
    if [[ -n "$lib" ]]; then export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
  done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$results/device.txt"
status=0
# step NAME SECONDS CMD...: runs CMD under a time limit, output to stdout and $results/NAME.txt.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee "$results/$name.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$results/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$results/$name.txt"
  [[ $rc -eq 0 ]] || status=1
}
want probe && step probe 20 bin/gpu-tests mma_layout_probe dynamic_shared
want tests && step gpu-tests 80 bin/gpu-tests
if want bench; then
  step bench-plan-bf16 5 bin/vox2vec-train --bench-plan --precision bf16 --report "$results/plan-bf16.json"
  for p in bf16 fp32; do
    step "bench-$p" 45 bin/vox2vec-train --device cuda --bench "${BENCH_STEPS:-20}" --precision "$p"
  done
fi
if want infer; then
  step infer 30 bin/vox2vec bench-infer --device cuda --batches 1,8 --precisions fp32,bf16 --iters 10 --report "$results/infer.json"
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step pytorch-infer 40 python3 pytorch_reference.py --device cuda --only infer --batches 1,8
  fi
fi
want lab && step kernel-lab 25 bin/kernel_lab --reps 10
if want sanitize; then
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -x "$sanitizer" ]]; then
    # Exact-size allocations, so that memcheck sees one element past a tensor (the caching
    # pool's size classes would hide it).
    VOX2VEC_EXACT_ALLOC=1 step sanitize-memcheck 50 "$sanitizer" --tool memcheck --leak-check no --error-exitcode 3 bin/gpu-tests mma_layout ops_
    step sanitize-racecheck 40 "$sanitizer" --tool racecheck --error-exitcode 3 bin/gpu-tests mma_layout ops_conv3d ops_resblock ops_head
    step sanitize-synccheck 30 "$sanitizer" --tool synccheck --error-exitcode 3 bin/gpu-tests mma_layout ops_conv3d ops_batchnorm ops_resblock ops_head
  else
    echo "sanitize: compute-sanitizer not found" | tee "$results/sanitize.txt"
  fi
fi
if want train; then
  # The full pretraining loop on the GPU: generated CT phantoms through the real pipeline
  # (preprocessing, sampler, loader), the reference batch, a checkpoint and metrics at the end.
  # The checkpoint (about 0.6 GB with Adam's moments) stays outside the results folder.
  run_dir=${TMPDIR:-/tmp}/vox2vec-train-phantoms
  rm -rf "$run_dir"
  step train 30 bin/vox2vec-train --device cuda --precision bf16 --steps "${TRAIN_STEPS:-5}" --out "$run_dir"
  cp "$run_dir/metrics.jsonl" "$run_dir/loss.png" "$results/" 2>/dev/null || true
fi
if want nccl; then
  if ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so '; then
    # pip's nvidia-nccl ships libnccl.so.2 only; cudarc loads libnccl.so.
    lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
    if [[ -n "$lib" && -e "$lib/libnccl.so.2" ]]; then
      mkdir -p "$here/nccl-lib" && ln -sf "$lib/libnccl.so.2" "$here/nccl-lib/libnccl.so"
      export LD_LIBRARY_PATH="$here/nccl-lib:${LD_LIBRARY_PATH:-}"
    fi
  fi
  nccl_dir=${TMPDIR:-/tmp}/vox2vec-train-nccl
  rm -rf "$nccl_dir"
  RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 step nccl-one-rank 30 bin/vox2vec-train --device cuda --synthetic-pairs --steps 3 --out "$nccl_dir"
fi
if want pytorch && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  step pytorch-step 40 python3 pytorch_reference.py --device cuda --only step --size reference
fi
echo "run.sh: done in $SECONDS s, status $status"
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out" | sed 's/^/gpu-bundle: /'
echo "gpu-bundle: on a GPU machine with the CUDA driver, run:"
echo "  bash gpu-bundle/run.sh            # or: bash gpu-bundle/run.sh probe tests bench"
