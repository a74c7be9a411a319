#!/usr/bin/env bash
# Instructions per small GET of the release larderd, counted by callgrind: repeatable whatever
# else the machine does, so it tells a change in the request path apart from noise.
#
#   bench/instructions-per-get.sh            # fast path on (the default)
#   LARDER_FAST_PATH=0 bench/instructions-per-get.sh   # every request through hyper
#   LARDERD=/tmp/larderd-before bench/instructions-per-get.sh   # a given build, not the tree's
#
# One worker under valgrind, COUNT objects of SIZE bytes PUT first, counters zeroed, then
# `wrk -t1 -c8 -d DURATION` GETs them in rotation (bench/wrk-bench.lua, BENCH_MODE=small); the
# total instructions of the process after the zero, divided by the requests wrk completed.
# Access log on, as by default. KEEP=DIR keeps callgrind's output there.
# Knobs: COUNT=200 SIZE=4096 DURATION=10s PORT=18591. Needs valgrind and wrk (apt-get install valgrind wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-200}
SIZE=${SIZE:-4096}
DURATION=${DURATION:-10s}
PORT=${PORT:-18591}
if [[ -z "${LARDERD:-}" ]]; then
    cargo build --release -q -p larderd
    LARDERD=target/release/larderd
fi
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
    "$LARDERD" --workers 1 --listen "127.0.0.1:$PORT" --data-dir "$work/data" \
    >"$work/stdout" 2>"$work/stderr" &
pid=$!
for _ in $(seq 600); do
    grep -q "listening" "$work/stdout" 2>/dev/null && break
    sleep 0.1
done
head -c "$SIZE" /dev/urandom >"$work/body"
for n in $(seq "$COUNT"); do
    curl -sf -T "$work/body" "http://127.0.0.1:$PORT/api/v1/object/bench/small-$n" >/dev/null
done
callgrind_control -z "$pid" >/dev/null 2>&1
out=$(BENCH_MODE=small BENCH_PREFIX="/api/v1/object/bench/small-" BENCH_COUNT="$COUNT" \
    wrk -t1 -c8 -d "$DURATION" -s bench/wrk-bench.lua "http://127.0.0.1:$PORT/")
requests=$(sed -n 's/.*WRKRESULT.* requests=\([0-9]*\).*/\1/p' <<<"$out")
callgrind_control -d "$pid" >/dev/null 2>&1
sleep 1
instructions=$(for f in "$work"/callgrind.out*; do
    sed -n 's/^summary: \([0-9]*\).*/\1/p' "$f"
done | sort -n | tail -1)
if [[ -n "${KEEP:-}" ]]; then cp "$work"/callgrind.out* "$KEEP"/; fi
echo "fast_path=${LARDER_FAST_PATH:-1} requests=$requests instructions=$instructions per_get=$((instructions / requests))"
