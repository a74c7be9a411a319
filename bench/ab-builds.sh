#!/usr/bin/env bash
# bench/ab-builds.sh — two or more larderd builds side by side on small GETs: which one costs
# less CPU per request. The tool behind BENCHMARKS.md round 9's step-by-step table.
#
# Each build serves one object of SIZE bytes from its own disk tier; `wrk -t2 -cCONNECTIONS
# -dDURATION --latency` GETs it from each build in turn, REPS times (alternating, so all builds see
# the same machine). Printed per build: the medians of requests/s, of the server's CPU time per
# request (user + system, all threads, from /proc/<pid>/stat), of its user time alone and of
# wrk's p99, and each median's ratio to the first build's. On a shared machine CPU per request is
# the steady figure; requests/s and p99 follow where the scheduler puts wrk's threads
# (BENCHMARKS.md, rounds 5 and 9). User time is what a change in the request path moves: system
# time (two thirds of the total on small GETs, loopback TCP both ways) varies by ±10 % between
# runs of one build, more than most such changes (BENCHMARKS.md, round 14).
#
# SPLIT=1 starts every build with one worker on core 0 and runs wrk on core 1.
#
# KEYS=N serves N objects of SIZE bytes instead of one, GET in rotation (bench/wrk-bench.lua,
# BENCH_MODE=small): a working set of many small cache entries, as a build tool reads them.
#
#   cargo build --release -p larderd && cp target/release/larderd /tmp/larderd-after
#   git stash && cargo build --release -p larderd && cp target/release/larderd /tmp/larderd-before && git stash pop
#   bench/ab-builds.sh /tmp/larderd-before /tmp/larderd-after
# Knobs: SIZE=4096 CONNECTIONS=64 DURATION=5s REPS=5 SPLIT=0 FIRST_PORT=18440 KEYS=1
# Needs wrk (installed from Debian when missing).
set -euo pipefail
(($# >= 2)) || { sed -n '2,/^# Needs/p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
SIZE=${SIZE:-4096}
CONNECTIONS=${CONNECTIONS:-64}
DURATION=${DURATION:-5s}
REPS=${REPS:-5}
KEYS=${KEYS:-1}
FIRST_PORT=${FIRST_PORT:-18440}
server_cpu=() generator_cpu=() workers=()
if [[ ${SPLIT:-0} == 1 ]]; then
    server_cpu=(taskset -c 0) generator_cpu=(taskset -c 1) workers=(--workers 1)
fi
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
for build in "$@"; do
    [[ -x $build ]] || { echo "not an executable: $build" >&2; exit 2; }
done
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
head -c "$SIZE" /dev/urandom >"$work/object"

urls=()
for n in $(seq 0 $(($# - 1))); do
    build=${*:$((n + 1)):1}
    port=$((FIRST_PORT + n))
    "${server_cpu[@]}" "$build" "${workers[@]}" --listen "127.0.0.1:$port" \
        --data-dir "$work/data-$n" >"$work/out-$n" 2>&1 &
    pids+=($!)
    url="http://127.0.0.1:$port/api/v1/object/bench/one"
    for _ in $(seq 100); do
        curl -sf -T "$work/object" "$url" >/dev/null 2>&1 && break
        sleep 0.1
    done
    cmp -s "$work/object" <(curl -sf "$url") || { echo "build $n does not serve the object" >&2; exit 1; }
    if ((KEYS > 1)); then
        seq "$KEYS" | xargs -P4 -I{} curl -sf -T "$work/object" \
            "http://127.0.0.1:$port/api/v1/object/bench/small-{}" -o /dev/null
        cmp -s "$work/object" <(curl -sf "http://127.0.0.1:$port/api/v1/object/bench/small-$KEYS") ||
            { echo "build $n does not serve small-$KEYS" >&2; exit 1; }
    fi
    urls+=("$url")
done
script=()
((KEYS > 1)) && script=(-s "$(dirname "$0")/wrk-bench.lua")
export BENCH_MODE=small BENCH_PREFIX=/api/v1/object/bench/small- BENCH_COUNT=$KEYS

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
user_ticks() { awk '{ print $14 }' "/proc/$1/stat"; }
for rep in $(seq "$REPS"); do
    for n in "${!urls[@]}"; do
        before=$(cpu_ticks "${pids[$n]}") user_before=$(user_ticks "${pids[$n]}")
        "${generator_cpu[@]}" wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "${script[@]}" \
            "${urls[$n]}" >"$work/wrk"
        after=$(cpu_ticks "${pids[$n]}") user_after=$(user_ticks "${pids[$n]}")
        # "build requests/s µs-per-request p99-ms user-µs-per-request"; wrk counts any answer, so
        # non-2xx must be 0.
        awk -v n="$n" -v ticks=$((after - before)) -v user=$((user_after - user_before)) \
            -v hz="$(getconf CLK_TCK)" '
            function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; return v * 1000 }
            /Non-2xx/ { bad = $NF }
            $1 == "99%" { p99 = ms($2) }
            $1 == "Requests/sec:" { rps = $2 }
            $2 == "requests" && $3 == "in" { requests = $1 }
            END {
                if (bad > 0) { print "build " n " answered " bad " requests with non-2xx" > "/dev/stderr"; exit 1 }
                printf "%d %.0f %.2f %.2f %.2f\n", n, rps, ticks / hz * 1e6 / requests, p99,
                    user / hz * 1e6 / requests
            }' "$work/wrk" | tee -a "$work/runs" |
            awk -v r="$rep" '{ printf "rep %d, build %d: %s req/s, %s µs CPU per request (user %s), p99 %s ms\n", r, $1, $2, $3, $5, $4 }' >&2
    done
done

median_of() { # build column
    awk -v n="$1" -v c="$2" '$1 == n { print $c }' "$work/runs" | sort -g |
        awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
layout="wrk and servers share the cores"
[[ ${SPLIT:-0} == 1 ]] && layout="servers on core 0 with one worker, wrk on core 1"
what="$SIZE-byte GETs"
((KEYS > 1)) && what="$SIZE-byte GETs of $KEYS keys in turn"
echo "| build ($what, $CONNECTIONS connections, medians of $REPS; $layout) | req/s | ratio | CPU µs per request | ratio | user µs per request | ratio | p99 ms | ratio |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
first=()
for n in "${!urls[@]}"; do
    row=("$(median_of "$n" 2)" "$(median_of "$n" 3)" "$(median_of "$n" 4)" "$(median_of "$n" 5)")
    ((n == 0)) && first=("${row[@]}")
    awk -v b="${*:$((n + 1)):1}" -v q="${row[0]}" -v c="${row[1]}" -v p="${row[2]}" -v u="${row[3]}" \
        -v q0="${first[0]}" -v c0="${first[1]}" -v p0="${first[2]}" -v u0="${first[3]}" 'BEGIN {
        printf "| %s | %.0f | %.3f | %.2f | %.3f | %.2f | %.3f | %.2f | %.2f |\n", b, q, q / q0, c, c / c0, u, u / u0, p, p / p0
    }'
done
