#!/usr/bin/env bash
# bench/one-object-latency.sh — latency under many connections on one object: larderd's disk tier
# against nginx serving the same bytes (sendfile, open_file_cache), the side by side of issue 13,
# item 3.
#
# `wrk -t2 -cCONNECTIONS -dDURATION --latency` GETs one object of SIZE bytes, over loopback, from
# larderd and from nginx in turn, REPS times each (alternating, so both see the same machine);
# larderd with its access log (one line per request, written to /dev/null by its log thread),
# nginx without one unless NGINX_LOG=1. Prints one line per run and the medians, and the ratios larderd /
# nginx of throughput, of p50 and p99, and of the server's CPU time per request (user + system,
# all threads: /proc/<pid>/stat before and after each run). Generator and servers share the
# machine's cores: the figures are only comparable within one run, and with small objects the
# throughput depends on where the scheduler puts wrk's threads (BENCHMARKS.md, round 5), so CPU
# per request is the steadier figure there.
#
# KEYS=N serves N objects of SIZE bytes instead of one, GET in rotation by each wrk thread
# (bench/wrk-bench.lua, BENCH_MODE=small): a working set of many small cache entries, as build
# tools read them. nginx's open_file_cache then holds 2N files, so it too keeps them all open.
#
# NGINX_LOG=1 gives nginx an access log too (the combined format, buffered 64 KiB, flushed every
# second, to /dev/null like larderd's): the like-for-like anchor; by default nginx logs nothing,
# the stricter one.
#
# SPLIT=1 gives the servers core 0 and wrk core 1 (both servers then start one worker), as if
# the generator ran on a machine of its own: the servers no longer compete with it for CPU, nor
# gain or lose by where the scheduler puts its threads.
#
#   bench/one-object-latency.sh
#   SIZE=4096 CONNECTIONS=64 REPS=5 bench/one-object-latency.sh   # the small-object row
#   SIZE=4096 CONNECTIONS=64 KEYS=2000 bench/one-object-latency.sh   # many small objects
# Knobs: SIZE=1048576 CONNECTIONS=500 DURATION=10s REPS=3 LARDER_PORT=18380 NGINX_PORT=18381 SPLIT=0
#        NGINX_LOG=0 KEYS=1 LARDERD=<binary> (a given build instead of the tree's, built in release)
# Needs nginx-light and wrk (installed from Debian when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib-nginx-static.sh
SIZE=${SIZE:-1048576}
CONNECTIONS=${CONNECTIONS:-500}
DURATION=${DURATION:-10s}
REPS=${REPS:-3}
KEYS=${KEYS:-1}
LPORT=${LARDER_PORT:-18380}
NPORT=${NGINX_PORT:-18381}
server_cpu=() generator_cpu=()
[[ ${SPLIT:-0} == 1 ]] && server_cpu=(taskset -c 0) generator_cpu=(taskset -c 1)
nginx_access_log="access_log off;"
[[ ${NGINX_LOG:-0} == 1 ]] && nginx_access_log="access_log /dev/null combined buffer=64k flush=1s;"
ensure_nginx_and_wrk
if [[ -z "${LARDERD:-}" ]]; then
    cargo build --release -q -p larderd
    LARDERD=target/release/larderd
fi
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

"${server_cpu[@]}" "$LARDERD" --listen "127.0.0.1:$LPORT" --data-dir "$work/data" \
    --max-connections $((CONNECTIONS * 2)) >"$work/larderd.out" 2>/dev/null &
pids+=($!)
mkdir -p "$work/www/obj" "$work/nginx"
head -c "$SIZE" /dev/urandom >"$work/www/obj/one"
((KEYS > 1)) && export NGINX_OPEN_FILES=$((2 * KEYS > 1000 ? 2 * KEYS : 1000))
nginx_static_conf "$work/nginx" "$work/www" "$NPORT" "$nginx_access_log" >"$work/nginx/nginx.conf"
"${server_cpu[@]}" nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
pids+=($!)
larderd_pid=${pids[0]} nginx_pid=${pids[1]}
for _ in $(seq 100); do
    grep -q listening "$work/larderd.out" 2>/dev/null && break
    sleep 0.1
done
curl -sf -T "$work/www/obj/one" "http://127.0.0.1:$LPORT/api/v1/object/bench/one" >/dev/null
larder_url="http://127.0.0.1:$LPORT/api/v1/object/bench/one"
nginx_url="http://127.0.0.1:$NPORT/obj/one"
# Both answer, with the same bytes.
cmp <(curl -sf "$larder_url") <(curl -sf "$nginx_url")
script=()
if ((KEYS > 1)); then
    for i in $(seq "$KEYS"); do ln "$work/www/obj/one" "$work/www/obj/small-$i"; done
    seq "$KEYS" | xargs -P4 -I{} curl -sf -T "$work/www/obj/one" \
        "http://127.0.0.1:$LPORT/api/v1/object/bench/small-{}" -o /dev/null
    cmp <(curl -sf "${larder_url%one}small-$KEYS") <(curl -sf "${nginx_url%one}small-$KEYS")
    script=(-s bench/wrk-bench.lua)
    export BENCH_MODE=small BENCH_COUNT=$KEYS
fi

# CPU ticks (user + system) of a process and its children (nginx's workers), all threads.
ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
    done
    echo "$total"
}
# wrk's latency figures in ms, bytes/s, requests/s and the server's CPU µs per request:
# "p50 p99 bytes_per_s requests_per_s cpu_us".
run() { # url server-pid
    local before after
    before=$(ticks "$2")
    BENCH_PREFIX="$(sed 's|^http://[^/]*||; s|one$|small-|' <<<"$1")" \
        "${generator_cpu[@]}" wrk -t2 -c"$CONNECTIONS" -d"$DURATION" --latency "${script[@]}" "$1" \
        >"$work/wrk.out"
    after=$(ticks "$2")
    awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        function bytes(v) { n = v + 0; if (v ~ /GB/) return n * 2^30; if (v ~ /MB/) return n * 2^20; if (v ~ /KB/) return n * 2^10; return n }
        $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) }
        $1 == "Transfer/sec:" { rate = bytes($2) }
        $1 == "Requests/sec:" { rps = $2 }
        $2 == "requests" && $3 == "in" { requests = $1 }
        END { printf "%.1f %.1f %.0f %.0f %.2f\n", p50, p99, rate, rps, ticks / hz * 1e6 / requests }' "$work/wrk.out"
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for rep in $(seq "$REPS"); do
    for server in larderd nginx; do
        url=$larder_url pid=$larderd_pid
        [[ $server == nginx ]] && url=$nginx_url pid=$nginx_pid
        read -r p50 p99 rate rps cpu < <(run "$url" "$pid")
        awk -v s="$server" -v r="$rep" -v a="$p50" -v b="$p99" -v c="$rate" -v u="$cpu" \
            'BEGIN { printf "%s rep %d: p50 %s ms, p99 %s ms, %.2f GB/s, %s µs CPU per request\n", s, r, a, b, c / 1e9, u }' >&2
        echo "$server $p50 $p99 $rate $rps $cpu" >>"$work/runs"
    done
done
col() { awk -v s="$1" -v c="$2" '$1 == s { print $c }' "$work/runs" | median; }
lp50=$(col larderd 2) lp99=$(col larderd 3) lrate=$(col larderd 4) lrps=$(col larderd 5) lcpu=$(col larderd 6)
np50=$(col nginx 2) np99=$(col nginx 3) nrate=$(col nginx 4) nrps=$(col nginx 5) ncpu=$(col nginx 6)
cores="generator and servers share the cores"
[[ ${SPLIT:-0} == 1 ]] && cores="servers on core 0, wrk on core 1"
[[ ${NGINX_LOG:-0} == 1 ]] && cores="$cores; nginx with a buffered access log"
what="one object of $SIZE bytes"
((KEYS > 1)) && what="$KEYS objects of $SIZE bytes in turn"
echo "| $what, $CONNECTIONS connections, medians of $REPS ($cores) | larderd | nginx | larderd / nginx |"
echo "| --- | ---: | ---: | ---: |"
awk -v lr="$lrate" -v nr="$nrate" -v l50="$lp50" -v n50="$np50" -v l99="$lp99" -v n99="$np99" \
    -v lq="$lrps" -v nq="$nrps" -v lc="$lcpu" -v nc="$ncpu" 'BEGIN {
    printf "| GB/s | %.2f | %.2f | %.2f× |\n", lr / 1e9, nr / 1e9, lr / nr
    printf "| requests/s | %.0f | %.0f | %.2f× |\n", lq, nq, lq / nq
    printf "| server CPU µs per request | %.2f | %.2f | %.2f |\n", lc, nc, lc / nc
    printf "| p50 ms | %s | %s | %.2f |\n", l50, n50, l50 / n50
    printf "| p99 ms | %s | %s | %.2f |\n", l99, n99, l99 / n99
}'
