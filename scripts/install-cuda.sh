#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, its front end, NVVM, the CCCL headers and the
# runtime headers, and the SASS readers) from NVIDIA's pip wheels into the git-ignored `.cuda/` folder of this
# checkout, so that build.rs compiles kernels/*.cu on any x86-64 Linux machine, GPU or not.
# 13.0 matches the GPU machines' driver (580, CUDA 13.0): a fatbin from a newer nvcc could
# carry PTX that driver cannot JIT. Idempotent: does nothing when the pinned nvcc is there.
#
#   scripts/install-cuda.sh            # then `cargo build` finds .cuda/bin/nvcc
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.cuda"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  # The SASS readers (cuobjdump -sass, nvdisasm): build.rs reads the kernels' sm_90 machine
  # code with them for the plan's issue time. 13.2.51 is the oldest the registry has; it
  # reads 13.0's cubins (a disassembler does not change the code it reads).
  nvidia-cuda-cuobjdump==13.2.51
  nvidia-cuda-nvdisasm==13.2.51
)
stamp="$root/.installed"
if [[ -x "$root/bin/nvcc" && -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
  echo "install-cuda: $("$root/bin/nvcc" --version | tail -1) already in $root"
  exit 0
fi
python=${PYTHON:-python3}
rm -rf "$root"
mkdir -p "$root"
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$root/pip" "${pins[@]}"
# The wheels unpack into nvidia/cu13/{bin,include,lib,nvvm}; expose that tree as .cuda/.
tree=$(dirname "$(dirname "$(find "$root/pip" -path '*/bin/nvcc' -type f | head -1)")")
[[ -d "$tree" ]] || { echo "install-cuda: no nvcc found in the installed wheels" >&2; exit 1; }
for d in "$tree"/*; do ln -sfn "$d" "$root/$(basename "$d")"; done
chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
"$root/bin/nvcc" --version | tail -2
echo "${pins[*]}" > "$stamp"
# A crate built before this install cached build.rs's "no nvcc" verdict: make cargo rerun it.
touch build.rs
echo "install-cuda: nvcc installed in $root (build.rs finds it there)"
