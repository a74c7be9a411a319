#!/usr/bin/env bash
# Runs every fuzz target for SECONDS_PER_TARGET seconds (default 60) and exits non-zero if any
# of them finds a crash, a failed invariant, a timeout or runaway memory.
#
#   fuzz/run.sh [SECONDS_PER_TARGET]
#
# Installs cargo-fuzz when it is missing. The targets are built with `--sanitizer none`: the
# machines this runs on have only the stable toolchain, which cannot build AddressSanitizer
# without RUSTC_BOOTSTRAP, and for this safe Rust code the fuzzer's value is in the coverage
# guidance and the invariants each target asserts; overflow checks and debug assertions stay on.
# Set FUZZ_SANITIZER=address (with RUSTC_BOOTSTRAP=1 on stable) to try ASan anyway.
#
# Each target starts from the seeds committed in fuzz/corpus/<target>/ (never modified) plus
# what earlier runs found, kept in fuzz/target/corpus/<target>/. A crashing input is written to
# fuzz/artifacts/<target>/ and its reproduction command is printed.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
sanitizer=${FUZZ_SANITIZER:-none}
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: fuzz/run.sh [SECONDS_PER_TARGET]" >&2
  exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  # --debug: it only drives cargo and libFuzzer, and an unoptimised build takes a third less
  # time, which matters for CI's fresh machines.
  cargo install cargo-fuzz --locked --debug
fi

echo "== building the fuzz targets"
cargo fuzz build --sanitizer "$sanitizer"

failed=()
summary=()
for target in $(cargo fuzz list); do
  work="target/corpus/$target"
  log="target/fuzz-$target.log"
  mkdir -p "$work" "corpus/$target"
  echo "== $target: ${seconds}s"
  status=0
  # The first corpus directory receives new inputs; the committed seeds stay read-only.
  cargo fuzz run --sanitizer "$sanitizer" "$target" "$work" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    summary+=("$target: FAILED after ${execs:-?} executions (exit $status), log $PWD/$log")
    tail -n 40 "$log"
  else
    summary+=("$target: ok, ${execs:-?} executions in ${seconds}s, ${cov:-cov ?}, corpus $(find "$work" -type f | wc -l) inputs")
  fi
done

echo "== summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found failures in: ${failed[*]}" >&2
  exit 1
fi
