#!/usr/bin/env bash
# bench/bare-server.sh — how far above nginx any server can get on small GETs on this machine:
# larderd and nginx against bench/bare-server, which answers every request with the same 4 KiB
# and does nothing else (a tokio variant, larderd's model with no work in it, and a bare epoll
# loop with no runtime). Issue 13, item 1 asks for 1.2× nginx's requests/s; this says how much
# of that the kernel and the generator leave to win.
#
# `wrk -t2 -c64 -dDURATION` GETs the object from each server in turn, REPS times (alternating);
# generator and servers share the cores, as in bench/one-object-latency.sh. Prints one line per
# run, then per server the medians of requests/s and of its CPU time per request (user + system,
# all threads and processes), and the ratios to nginx's.
#
#   bench/bare-server.sh
# Knobs: SIZE=4096 CONNECTIONS=64 DURATION=6s REPS=5 FIRST_PORT=18470
# Needs nginx-light and wrk (installed from Debian when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib-nginx-static.sh
SIZE=${SIZE:-4096}
CONNECTIONS=${CONNECTIONS:-64}
DURATION=${DURATION:-6s}
REPS=${REPS:-5}
PORT=${FIRST_PORT:-18470}
ensure_nginx_and_wrk
cargo build --release -q -p larderd
CARGO_TARGET_DIR=target/bench-bare cargo build --release -q --manifest-path bench/bare-server/Cargo.toml
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
head -c "$SIZE" /dev/urandom >"$work/object"
declare -A url pid

target/release/larderd --listen "127.0.0.1:$PORT" --data-dir "$work/data" >"$work/larderd.out" 2>/dev/null &
pids+=($!) pid[larderd]=$!
url[larderd]=http://127.0.0.1:$PORT/api/v1/object/bench/one

mkdir -p "$work/www" "$work/nginx"
cp "$work/object" "$work/www/one"
nginx_static_conf "$work/nginx" "$work/www" $((PORT + 1)) >"$work/nginx/nginx.conf"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
pids+=($!) pid[nginx]=$!
url[nginx]=http://127.0.0.1:$((PORT + 1))/one

for variant in tokio epoll; do
    port=$((PORT + 2)); [[ $variant == epoll ]] && port=$((PORT + 3))
    target/bench-bare/release/bare-server "$variant" "$port" "$SIZE" >"$work/$variant.out" &
    pids+=($!) pid[bare-$variant]=$!
    url[bare-$variant]=http://127.0.0.1:$port/one
done
for _ in $(seq 100); do
    grep -q listening "$work/larderd.out" 2>/dev/null && break
    sleep 0.1
done
curl -sf -T "$work/object" "${url[larderd]}" >/dev/null
servers=(nginx larderd bare-tokio bare-epoll)
for server in "${servers[@]}"; do
    # Every server answers 200 with SIZE bytes (the bare ones with other bytes: they never read).
    got=$(curl -sf -o /dev/null -w '%{http_code} %{size_download}' "${url[$server]}")
    [[ $got == "200 $SIZE" ]] || { echo "$server answered $got" >&2; exit 1; }
done

# CPU ticks (user + system) of a process and its children (nginx's workers), all threads.
ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
    done
    echo "$total"
}
for rep in $(seq "$REPS"); do
    for server in "${servers[@]}"; do
        before=$(ticks "${pid[$server]}")
        wrk -t2 -c"$CONNECTIONS" -d"$DURATION" "${url[$server]}" >"$work/wrk.out"
        after=$(ticks "${pid[$server]}")
        awk -v s="$server" -v r="$rep" -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
            $1 == "Requests/sec:" { rps = $2 }
            $2 == "requests" && $3 == "in" { requests = $1 }
            END { printf "%s %d %.0f %.2f\n", s, r, rps, ticks / hz * 1e6 / requests }' \
            "$work/wrk.out" | tee -a "$work/runs" >&2
    done
done
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { awk -v s="$1" -v c="$2" '$1 == s { print $c }' "$work/runs" | median; }
nrps=$(col nginx 3) ncpu=$(col nginx 4)
echo "| server ($SIZE-byte GETs, $CONNECTIONS connections, medians of $REPS; wrk and servers share the cores) | req/s | / nginx | CPU µs per request | / nginx |"
echo "| --- | ---: | ---: | ---: | ---: |"
for server in "${servers[@]}"; do
    awk -v s="$server" -v r="$(col "$server" 3)" -v c="$(col "$server" 4)" -v nr="$nrps" -v nc="$ncpu" \
        'BEGIN { printf "| %s | %.0f | %.2f× | %.2f | %.2f |\n", s, r, r / nr, c, c / nc }'
done
