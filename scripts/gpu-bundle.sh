#!/usr/bin/env bash
# Builds, on a machine without a GPU, the binaries that gpu-bundle/run.sh runs on a GPU
# machine (which has the CUDA driver but no Rust), into the git-ignored gpu-bundle/bin/:
#   gpu-tests      the GPU test binary (tests/gpu/)
#   vox2vec-train  the trainer: --bench, --bench-plan, --compare-precisions, training
#   vox2vec        the tools: bench-infer
#   kernel_lab     the kernel lab (dev/kernel_lab.rs)
#   BUILD_INFO     the commit (and whether the tree had changes), the date, the architectures
# The kernels are built for sm_90 only (H100 and H200), without PTX, and the binaries carry no
# debug info, so that the folder stays far inside the device's 64 MiB carry; it uses its own
# target folder (target/gpu-bundle), so the usual build is left as it is.
#
#   scripts/gpu-bundle.sh     # then carry gpu-bundle/bin and run: bash gpu-bundle/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda.sh >/dev/null
out=gpu-bundle/bin
archs=${VOX2VEC_CUDA_ARCHS:-sm_90}
export VOX2VEC_CUDA_ARCHS=$archs CARGO_TARGET_DIR=target/gpu-bundle
rm -rf "$out"
mkdir -p "$out"
cargo build --release --bin vox2vec-train --bin vox2vec --example kernel_lab
gpu_test=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
[[ -x "$gpu_test" ]] || { echo "gpu-bundle: the GPU test binary was not built" >&2; exit 1; }
strip --strip-debug -o "$out/gpu-tests" "$gpu_test"
for b in vox2vec-train vox2vec; do
  strip --strip-debug -o "$out/$b" "$CARGO_TARGET_DIR/release/$b"
done
strip --strip-debug -o "$out/kernel_lab" "$CARGO_TARGET_DIR/release/examples/kernel_lab"
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ", with uncommitted changes" || true)
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$dirty"
  echo "built $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "kernels $archs ($(.cuda/bin/nvcc --version | tail -1 | sed 's/^Build //'))"
} >"$out/BUILD_INFO"
du -sh "$out" | sed 's/^/gpu-bundle: /'
size=$(du -sm "$out" | cut -f1)
if (( size > 40 )); then
  echo "gpu-bundle: $out is ${size} MiB; with the repository it must stay under the device's 64 MiB" >&2
  exit 1
fi
echo "gpu-bundle: on the GPU machine, with gpu-bundle/bin carried: bash gpu-bundle/run.sh"
