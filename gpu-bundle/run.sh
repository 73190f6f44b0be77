#!/usr/bin/env bash
# The GPU bundle: every check of vox2vec-rs that needs a GPU, in one call that fits a short
# device lease (15 minutes in all, one command at most 10, at most 8 files back).
#
#   scripts/gpu-bundle.sh              # here, without a GPU: builds gpu-bundle/bin/ (sm_90 only)
#   bash gpu-bundle/run.sh             # on the GPU machine, from a copy of the repository with
#                                      # gpu-bundle/bin/ carried along
#   bash gpu-bundle/run.sh --dry-run   # anywhere: lists the phases and their limits and writes
#                                      # the summary in the same format (CI checks the format)
#   bash gpu-bundle/run.sh probe tests # some phases only
#
# The essential phases come first, in the order of what they decide, each under its own time
# limit (they add up to at most 300 s); the optional ones run after them only while the
# whole run's budget (BUNDLE_BUDGET_S, default 540 s) still holds their limit:
#   probe         the mma/ldmatrix fragment-layout probe: if it fails, every tensor-core result does
#   tests         every GPU test against the CPU oracle, each printing its actual error
#   bench-bf16    --bench (20 steps) of the reference step in bf16: ms/step as a CUDA graph and
#                 issued one call at a time, peak memory, kernels
#   plan          --bench-plan for this card: the estimate beside the floor (no GPU work)
#   pytorch-bf16  PyTorch's reference step on the same card: bf16 autocast, channels_last_3d,
#                 cudnn.benchmark (skipped, and said so, where torch with CUDA is missing)
#   precision     the reference step in bf16 against fp32 on the same batch and weights
#   bench-fp32    --bench 3 of the reference step in fp32
#   infer         bench-infer: patches/s of the eval pyramid, 1 and 8 windows, fp32 and bf16
#   lab           (optional) the kernel lab: every version of each hot kernel, checked and timed
#   sanitize      (optional) compute-sanitizer memcheck and racecheck on the convolution tests
#   train         (optional) 5 pretraining steps on CT phantoms through the real pipeline
#   nccl          (optional) 3 steps as a one-rank NCCL group (the data-parallel path)
#
# Output: $OUT/summary.txt (commit, GPU, driver, clocks, one line per phase: status, seconds,
# key numbers) and $OUT/bundle-results.tar.gz (every phase's full log and report); without
# $OUT both go to gpu-bundle/results/. The summary is also the last lines of stdout.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

dry_run=0
phases_wanted=()
for a in "$@"; do
  case "$a" in
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run.sh: unknown option $a (see --help)" >&2; exit 2 ;;
    *) phases_wanted+=("$a") ;;
  esac
done

# name|limit in seconds|essential or optional
PHASES=(
  "probe|15|essential"
  "tests|90|essential"
  "bench-bf16|35|essential"
  "plan|10|essential"
  "pytorch-bf16|60|essential"
  "precision|30|essential"
  "bench-fp32|30|essential"
  "infer|30|essential"
  "lab|45|optional"
  "sanitize|100|optional"
  "train|30|optional"
  "nccl|30|optional"
)
known=" $(for p in "${PHASES[@]}"; do printf '%s ' "${p%%|*}"; done)"
for w in "${phases_wanted[@]}"; do
  [[ "$known" == *" $w "* ]] || { echo "run.sh: unknown phase $w (phases:$known)" >&2; exit 2; }
done
budget=${BUNDLE_BUDGET_S:-540}

out=${OUT:-$here/results}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/vox2vec-bundle.XXXXXX")
logs=$work/results
mkdir -p "$logs"
summary=$work/summary.txt
bin=$here/bin

# --- what ran where -------------------------------------------------------------------------
if [[ -f "$bin/BUILD_INFO" ]]; then
  build_info=$(tr '\n' ' ' <"$bin/BUILD_INFO" | sed 's/ *$//')
elif git -C "$root" rev-parse --short HEAD >/dev/null 2>&1; then
  build_info="commit $(git -C "$root" rev-parse --short HEAD) (no gpu-bundle/bin/BUILD_INFO: binaries not built)"
else
  build_info="commit unknown (no gpu-bundle/bin/BUILD_INFO)"
fi
smi() { nvidia-smi --query-gpu="$1" --format=csv,noheader,nounits 2>/dev/null | head -1; }
if command -v nvidia-smi >/dev/null 2>&1 && [[ -n "$(smi name)" ]]; then
  gpu_line="$(smi name) | driver $(smi driver_version) | memory $(smi memory.total) MiB"
  clocks_line="sm $(smi clocks.sm)/$(smi clocks.max.sm) MHz, memory $(smi clocks.mem)/$(smi clocks.max.mem) MHz, power limit $(smi power.limit) W"
  case "$(smi name)" in
    *H200*) card=h200 ;;
    *) card=h100 ;;
  esac
  nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
else
  gpu_line="none (nvidia-smi not found or no GPU)"
  clocks_line="n/a"
  card=h100
fi

# cuBLAS: the system's, or the one in a pip wheel (PyTorch's dependencies).
if [[ $dry_run == 0 ]] && ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.1[23]'; then
  for r in /usr/local/cuda /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    lib=$(find "$r" -name 'libcublas.so.1[23]*' 2>/dev/null | head -1)
    if [[ -n "$lib" ]]; then export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
  done
fi

have_torch_cuda() { python3 -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; }
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)

# --- the phases -----------------------------------------------------------------------------
# phase_cmd NAME: runs the phase (output to stdout); returns its status. A phase that cannot run
# here prints "SKIP: why" and returns 77.
need() { [[ -x "$bin/$1" ]] || { echo "SKIP: gpu-bundle/bin/$1 missing (build it with scripts/gpu-bundle.sh)"; return 77; }; }
# The GPU tests exit 0 having skipped every case where no CUDA device is usable: a skip here.
gpu_tests() {
  need gpu-tests || return $?
  local rc
  "$bin/gpu-tests" "$@" | tee "$work/gpu-tests.out"
  rc=${PIPESTATUS[0]}
  if grep -q '^GPU tests SKIPPED' "$work/gpu-tests.out"; then
    echo "SKIP: $(grep -m1 '^GPU tests SKIPPED' "$work/gpu-tests.out" | sed 's/^GPU tests SKIPPED //')"
    return 77
  fi
  return "$rc"
}
phase_cmd() {
  case "$1" in
    probe) gpu_tests mma_layout_probe dynamic_shared ;;
    tests) gpu_tests ;;
    bench-bf16) need vox2vec-train && "$bin/vox2vec-train" --device cuda --bench 20 --precision bf16 ;;
    plan) need vox2vec-train && "$bin/vox2vec-train" --bench-plan --precision bf16 --report "$logs/plan-bf16.json" ;;
    pytorch-bf16)
      have_torch_cuda || { echo "SKIP: python3 has no torch with CUDA here"; return 77; }
      python3 dev/pytorch_reference.py --device cuda --only step --size reference --precision bf16 ;;
    precision) need vox2vec-train && "$bin/vox2vec-train" --device cuda --compare-precisions --report "$logs/precision.json" ;;
    bench-fp32) need vox2vec-train && "$bin/vox2vec-train" --device cuda --bench 3 --precision fp32 ;;
    infer) need vox2vec && "$bin/vox2vec" bench-infer --device cuda --batches 1,8 --precisions fp32,bf16 --iters 10 --report "$logs/infer.json" ;;
    lab) need kernel_lab && "$bin/kernel_lab" --reps 10 ;;
    sanitize)
      need gpu-tests || return $?
      [[ -x "$sanitizer" ]] || { echo "SKIP: compute-sanitizer not found"; return 77; }
      # Exact-size allocations, so that memcheck sees one element past a tensor (the caching
      # pool's size classes would hide it).
      local rc=0
      VOX2VEC_EXACT_ALLOC=1 "$sanitizer" --tool memcheck --leak-check no --error-exitcode 3 "$bin/gpu-tests" mma_layout ops_conv3d ops_resblock_fused || rc=$?
      "$sanitizer" --tool racecheck --error-exitcode 3 "$bin/gpu-tests" ops_conv3d ops_resblock_fused || rc=$?
      return $rc ;;
    train)
      need vox2vec-train || return $?
      local dir=$work/train-phantoms
      "$bin/vox2vec-train" --device cuda --precision bf16 --steps 5 --out "$dir" || return $?
      cp "$dir/metrics.jsonl" "$dir/loss.png" "$logs/" 2>/dev/null || true ;;
    nccl)
      need vox2vec-train || return $?
      if ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so '; then
        # pip's nvidia-nccl ships libnccl.so.2 only; cudarc loads libnccl.so.
        local lib
        lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
        if [[ -n "$lib" && -e "$lib/libnccl.so.2" ]]; then
          mkdir -p "$work/nccl-lib" && ln -sf "$lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"
          export LD_LIBRARY_PATH="$work/nccl-lib:${LD_LIBRARY_PATH:-}"
        else
          echo "SKIP: no libnccl.so (system or pip's nvidia-nccl)"; return 77
        fi
      fi
      RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 "$bin/vox2vec-train" --device cuda --synthetic-pairs --steps 3 --out "$work/train-nccl" ;;
  esac
}

# key_numbers NAME LOG: the figures of a phase's log worth a line in the summary.
key_numbers() {
  local log=$2
  case "$1" in
    probe | tests | sanitize)
      { grep -E '^test result:' "$log" | tail -1; grep -E 'FAILED$|\.\.\. FAILED' "$log" | sed 's/^test //; s/ \.\.\. FAILED//' | tr '\n' ' ' | sed 's/^./failed: &/'; grep -E 'ERROR SUMMARY' "$log" | tr '\n' ' '; } | tr '\n' ' ' ;;
    bench-bf16 | bench-fp32)
      { grep -oE 'median [0-9.]+ ms/step' "$log" | head -1; grep -oE 'peak device memory [0-9.]+ GiB in use' "$log" | head -1;
        grep -oE '[0-9]+ steps relaunched a kept graph unchanged' "$log" | head -1 | sed 's/ a kept graph unchanged//';
        grep -oE 'one by one \(no graph\): median [0-9.]+ ms/step' "$log" | head -1 | sed 's/ (no graph)//'; } | tr '\n' ';' ;;
    plan) grep -oE 'peak device memory [0-9.]+ GiB in use|[0-9]+ launches|floor [0-9.]+ ms/step|estimate [0-9.]+ ms/step' "$log" | tr '\n' ';' ;;
    pytorch-bf16) { grep -oE 'median [0-9.]+ ms' "$log" | head -1; grep -oE 'peak memory: [0-9.]+ GiB' "$log"; } | tr '\n' ';' ;;
    precision) grep -E '^precision: ' "$log" | sed 's/^precision: //' | tr '\n' ';' ;;
    infer) grep -E '^(fp32|bf16) ' "$log" | awk '{printf "%s b%s %s/s; ", $1, $2, $4}' ;;
    lab) grep -cE '\bFAIL' "$log" | sed 's/^/lines with FAIL: /' ;;
    train | nccl) grep -oE 'loss [0-9.]+' "$log" | tail -1 ;;
  esac
}

{
  echo "vox2vec-rs GPU bundle summary ($( [[ $dry_run == 1 ]] && echo dry run || echo run ), $(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo "build: $build_info"
  echo "gpu: $gpu_line"
  echo "clocks: $clocks_line"
  echo "card priced by the plan: $card"
} >"$summary"

t_start=$SECONDS
counts_ok=0 counts_failed=0 counts_skipped=0
essential_total=0
for p in "${PHASES[@]}"; do
  IFS='|' read -r name limit kind <<<"$p"
  [[ $kind == essential ]] && essential_total=$((essential_total + limit))
  if [[ ${#phases_wanted[@]} -gt 0 && " ${phases_wanted[*]} " != *" $name "* ]]; then
    continue
  fi
  log=$logs/$name.txt
  if [[ $dry_run == 1 ]]; then
    echo "== $name ($kind, limit ${limit} s)"
    printf 'phase %-13s | %-24s | %4d s of %4d s | %s\n' "$name" "dry-run" 0 "$limit" "$kind" >>"$summary"
    echo "dry run: not executed" >"$log"
    continue
  fi
  left=$((budget - (SECONDS - t_start)))
  if [[ $kind == optional && $left -lt $limit ]]; then
    printf 'phase %-13s | %-24s | %4d s of %4d s | %s\n' "$name" "skipped" 0 "$limit" "${left} s of the ${budget} s budget left" >>"$summary"
    counts_skipped=$((counts_skipped + 1))
    continue
  fi
  echo "== $name ($kind, limit ${limit} s)" | tee "$log"
  t0=$SECONDS
  # A subshell per phase: a phase's exports stay its own. --kill-after: a hung phase that
  # ignores SIGTERM must not eat the rest of the lease.
  ( export -f phase_cmd need gpu_tests have_torch_cuda; export bin logs work sanitizer
    timeout --kill-after=5 "$limit" bash -c 'phase_cmd "$1"' _ "$name" ) 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  secs=$((SECONDS - t0))
  case $rc in
    0) status=ok; counts_ok=$((counts_ok + 1)) ;;
    77) status=skipped; counts_skipped=$((counts_skipped + 1)) ;;
    124 | 137) status="TIMEOUT (rc $rc)"; counts_failed=$((counts_failed + 1)) ;;
    *) status="FAILED (rc $rc)"; counts_failed=$((counts_failed + 1)) ;;
  esac
  if [[ $rc == 77 ]]; then
    numbers=$(grep -m1 '^SKIP: ' "$log" | sed 's/^SKIP: //')
  else
    numbers=$(key_numbers "$name" "$log" 2>/dev/null | tr -s ' ' | sed 's/[; ]*$//')
  fi
  echo "== $name: $status in ${secs} s" | tee -a "$log"
  printf 'phase %-13s | %-24s | %4d s of %4d s | %s\n' "$name" "$status" "$secs" "$limit" "${numbers:--}" >>"$summary"
done

{
  echo "essential phases' limits: ${essential_total} s in all"
  if [[ $dry_run == 1 ]]; then
    echo "total: dry run, nothing executed"
  else
    echo "total: $((SECONDS - t_start)) s; phases ok $counts_ok, failed $counts_failed, skipped $counts_skipped"
  fi
  echo "files: summary.txt, bundle-results.tar.gz ($(($(ls "$logs" | wc -l) + 1)) files: every phase's log and report, this summary)"
} >>"$summary"
cp "$summary" "$logs/summary.txt"
tar -czf "$out/bundle-results.tar.gz" -C "$work" results
cp "$summary" "$out/summary.txt"
rm -rf "$work"
echo
cat "$out/summary.txt"
[[ $counts_failed == 0 ]]
