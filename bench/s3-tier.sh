#!/usr/bin/env bash
# bench/s3-tier.sh — larderd's S3 tier against the S3 server itself (issue 3).
#
# Everything over loopback, on a throw-away Ceph RGW started by scripts/s3-server.sh:
#   (a) 1 GiB GET through larderd from the S3 tier (the local copy is invalidated before every
#       GET, so each one is a miss streamed through a fill) vs the same bytes GET directly from
#       RGW with the same client (curl, SigV4) -> ratio of throughputs, target >= 0.95x, and of
#       times to first byte. Twice: with all processes sharing the cores, and with RGW alone
#       on core 0 and larderd and curl on core 1 (the S3 server as if on a machine of its own).
#       In the same runs, nginx in front of the same RGW, as a platform team would put it there:
#       a caching proxy (proxy_cache, a miss each time: it streams to the client while it writes
#       its cache file, as larderd's fill does), and a plain proxy (no cache, no buffering) —
#       what any process between client and S3 costs on these cores. nginx cannot sign SigV4,
#       so its object is public-read and it reads anonymously.
#   (b) 16 clients asking at once for the same cold 1 GiB object on one replica -> how many
#       S3 body reads larderd made (larder_s3_body_reads_total from /metrics), target 1.
#   (c) 64 MiB pinned (If-Match) range GETs, 4 connections, served from disk after the fill,
#       vs the same on a disk-only larderd (the foundation's disk benchmark) -> ratio, target ~1.
#
# Run as root from anywhere (installs radosgw and wrk when missing; ~6 minutes):
#   bench/s3-tier.sh
# Knobs: REPS=3 S3_PORT=9400 LARDER_PORT=18180 SIZE_MIB=1024 KEEP=0 (1 keeps target/bench-s3).
# Prints a Markdown table.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$REPO/target/bench-s3
REPS=${REPS:-3}
S3_PORT=${S3_PORT:-9400}
LPORT=${LARDER_PORT:-18180}
DPORT=$((LPORT + 1))
SIZE_MIB=${SIZE_MIB:-1024}
log() { echo "[$(date +%T)] $*" >&2; }

command -v wrk >/dev/null && command -v nginx >/dev/null \
  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk nginx-light >&2; }
(cd "$REPO" && cargo build --release -q -p larderd)
BIN=$REPO/target/release/larderd

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/s3/run/s3.pid" ] && "$REPO/scripts/s3-server.sh" stop "$WORK/s3" >/dev/null 2>&1 || true
  # About 5 GB (the object twice, RGW's OSD, two data dirs): kept only when asked for.
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK"
rm -rf "$WORK/larder" "$WORK/disk-only" "$WORK/big"
set -a
eval "$("$REPO/scripts/s3-server.sh" --port "$S3_PORT" --data-dir "$WORK/s3" --bucket bench)"
set +a

start_larderd() { # port data-dir [args...]
  local port=$1 dir=$2; shift 2
  LARDER_LOG=warn "$BIN" --listen "127.0.0.1:$port" --data-dir "$dir" "$@" >"$dir.out" 2>"$dir.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q "listening" "$dir.out" 2>/dev/null && return 0; sleep 0.1; done
  echo "larderd on $port did not start" >&2; cat "$dir.err" >&2; exit 1
}
start_larderd "$LPORT" "$WORK/larder" --s3-bucket bench --s3-prefix bench
start_larderd "$DPORT" "$WORK/disk-only"

log "writing a ${SIZE_MIB} MiB object"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$WORK/big"
URL=http://127.0.0.1:$LPORT/api/v1/object/bench/big
curl -sf -T "$WORK/big" "$URL" >/dev/null
curl -sf -T "$WORK/big" "http://127.0.0.1:$DPORT/api/v1/object/bench/big" >/dev/null
ETAG=$(curl -sfI "$URL" | tr -d '\r' | awk 'tolower($1)=="etag:" {print $2}')
# RGW wants the payload hash header on every SigV4 request; GETs have an empty payload.
sigv4=(--aws-sigv4 "aws:amz:$AWS_REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY")
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
DIRECT=$AWS_ENDPOINT_URL/bench/direct-big
curl -sf "${sigv4[@]}" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -H "x-amz-acl: public-read" \
  -T "$WORK/big" "$DIRECT" >/dev/null
size=$(curl -sfI "${sigv4[@]}" -H "x-amz-content-sha256: $EMPTY_SHA256" "$DIRECT" | tr -d '\r' | awk 'tolower($1)=="content-length:" {print $2}')
[ "$size" = $((SIZE_MIB << 20)) ] || { echo "direct object has $size bytes" >&2; exit 1; }

NPORT=$((LPORT + 2))
mkdir -p "$WORK/nginx/tmp" "$WORK/nginx/cache"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
$([[ $(id -u) -eq 0 ]] && echo "user root;")
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    proxy_temp_path $WORK/nginx/tmp;
    client_body_temp_path $WORK/nginx/tmp;
    proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=s3:10m max_size=20g use_temp_path=off;
    server {
        listen 127.0.0.1:$NPORT;
        location /cache/ {
            proxy_pass http://127.0.0.1:$S3_PORT/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache s3;
            proxy_cache_key \$request_uri;
            proxy_cache_valid 200 1h;
        }
        location /pass/ {
            proxy_pass http://127.0.0.1:$S3_PORT/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" &
pids+=($!)
for _ in $(seq 50); do curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:$NPORT/pass/bench/direct-big" && break; sleep 0.1; done
# The same bytes through nginx as from RGW.
cmp <(curl -sf -r 0-1048575 "http://127.0.0.1:$NPORT/pass/bench/direct-big") <(head -c 1048576 "$WORK/big")

body_reads() { curl -sf "http://127.0.0.1:$LPORT/metrics" | awk '/^larder_s3_body_reads_total/ {print $2}' | tail -1; }
command -v bc >/dev/null || { apt-get install -y -qq --no-install-recommends bc >&2; }

# (a) in two CPU layouts. "shared": everything on both cores, as the rest of this file. "split":
# RGW (with its OSD and monitor) alone on core 0, larderd and curl on core 1, for both the miss
# and the direct read: the S3 server then gets the same CPU in both, as it would on a machine of
# its own, and larderd's own cost per byte is what it takes from the client's core.
ceph_pids() { pgrep -f "$WORK/s3/ceph.conf" || true; }
larderd_pid() { echo "${pids[0]}"; }
nginx_pids() { echo "${pids[2]}"; pgrep -P "${pids[2]}" || true; }
all_cores="0-$(($(nproc) - 1))"
layout() { # shared|split
  local p
  if [ "$1" = split ]; then
    for p in $(ceph_pids); do taskset -a -p -c 0 "$p" >/dev/null; done
    for p in "$(larderd_pid)" $(nginx_pids); do taskset -a -p -c 1 "$p" >/dev/null; done
    client=(taskset -c 1)
  else
    for p in $(ceph_pids) "$(larderd_pid)" $(nginx_pids); do taskset -a -p -c "$all_cores" "$p" >/dev/null; done
    client=()
  fi
}
# Prints "seconds time-to-first-byte" of one GET.
# A second between reads lets the miss's fill commit (an fsync) before the next one starts.
timed_get() {
  "${client[@]}" curl -sf -o /dev/null -w '%{time_total} %{time_starttransfer}\n' "$@" || echo "failed: curl $*" >&2
  sleep 1
}
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
declare -A wall ttfb
log "(a) GET through larderd (miss each time) vs GET directly from RGW"
for lay in shared split; do
  layout "$lay"
  : > "$WORK/a-$lay"
  for r in $(seq "$REPS"); do
    curl -sf -X POST "$URL/invalidate" >/dev/null
    read -r t f < <(timed_get "$URL"); [[ $f ]] || exit 1; log "$lay rep $r larderd-from-s3 ${t}s, first byte ${f}s"
    echo "miss $t $f" >> "$WORK/a-$lay"
    read -r t f < <(timed_get "${sigv4[@]}" -H "x-amz-content-sha256: $EMPTY_SHA256" "$DIRECT")
    [[ $f ]] || exit 1
    log "$lay rep $r rgw-direct ${t}s, first byte ${f}s"
    echo "direct $t $f" >> "$WORK/a-$lay"
    # A new cache key each time: a miss, like larderd's.
    read -r t f < <(timed_get "http://127.0.0.1:$NPORT/cache/bench/direct-big?rep=$lay-$r")
    [[ $f ]] || exit 1
    log "$lay rep $r nginx-cache-miss ${t}s, first byte ${f}s"
    echo "nginx-cache $t $f" >> "$WORK/a-$lay"
    find "$WORK/nginx/cache" -type f -delete # 1 GiB each, never read again
    read -r t f < <(timed_get "http://127.0.0.1:$NPORT/pass/bench/direct-big")
    [[ $f ]] || exit 1
    log "$lay rep $r nginx-proxy ${t}s, first byte ${f}s"
    echo "nginx-proxy $t $f" >> "$WORK/a-$lay"
  done
  for who in miss direct nginx-cache nginx-proxy; do
    wall[$lay.$who]=$(awk -v w=$who '$1 == w {print $2}' "$WORK/a-$lay" | median)
    ttfb[$lay.$who]=$(awk -v w=$who '$1 == w {print $3}' "$WORK/a-$lay" | median)
  done
done
layout shared
sleep 2 # let the last fill commit

log "(b) 16 concurrent cold GETs on one replica"
curl -sf -X POST "$URL/invalidate" >/dev/null
before=$(body_reads)
clients=()
for _ in $(seq 16); do curl -sf -o /dev/null "$URL" & clients+=($!); done
wait "${clients[@]}" # not a bare wait: the larderd servers are children too
sleep 1
after=$(body_reads)
reads=$(echo "$after - $before" | bc)

log "(c) pinned 64 MiB ranges from disk after the fill vs disk-only larderd"
range_rate() { # port
  BENCH_MODE=range BENCH_PATH=/api/v1/object/bench/big BENCH_RANGE_SIZE=$((64 << 20)) \
    BENCH_OBJECT_SIZE=$((SIZE_MIB << 20)) BENCH_IF_MATCH=$ETAG \
    wrk -t2 -c4 -d8s -s "$REPO/bench/wrk-bench.lua" "http://127.0.0.1:$1/" 2>/dev/null |
    sed -n 's/.*WRKRESULT bytes=\([0-9]*\).*duration_us=\([0-9]*\).*err_status=\([0-9]*\).*/\1 \2 \3/p'
}
best_t=0; best_o=0
for r in $(seq "$REPS"); do
  for which in tiered disk; do
    port=$LPORT; [ $which = disk ] && port=$DPORT
    read -r bytes us bad < <(range_rate "$port")
    [ "$bad" = 0 ] || { echo "non-2xx answers from $which: $bad" >&2; exit 1; }
    rate=$(echo "$bytes / $us * 1000000 / 1073741824" | bc -l)
    log "rep $r $which $(printf %.2f "$rate") GiB/s"
    if [ $which = tiered ]; then (( $(echo "$rate > $best_t" | bc -l) )) && best_t=$rate
    else (( $(echo "$rate > $best_o" | bc -l) )) && best_o=$rate; fi
  done
done

gib=$(echo "$SIZE_MIB / 1024" | bc -l)
echo "Run: $(date -u); $(nproc) cores; kernel $(uname -r); (a): medians of $REPS, (c): best of $REPS"
echo
echo "| row | larderd | reference | ratio | target |"
echo "| --- | ---: | ---: | ---: | --- |"
for lay in shared split; do
  rl=$(echo "$gib / ${wall[$lay.miss]}" | bc -l); rd=$(echo "$gib / ${wall[$lay.direct]}" | bc -l)
  what="cores shared by all"; [ $lay = split ] && what="RGW alone on core 0, larderd + curl on core 1"
  printf '| %s MiB GET, miss through the S3 tier vs direct from RGW (curl; %s) | %.2f GiB/s | %.2f GiB/s | %.2f× | ≥ 0.95× |\n' \
    "$SIZE_MIB" "$what" "$rl" "$rd" "$(echo "$rl / $rd" | bc -l)"
  printf '| time to first byte of that miss vs direct (%s) | %.0f ms | %.0f ms | %.2f× | — |\n' \
    "$what" "$(echo "${ttfb[$lay.miss]} * 1000" | bc -l)" "$(echo "${ttfb[$lay.direct]} * 1000" | bc -l)" \
    "$(echo "${ttfb[$lay.miss]} / ${ttfb[$lay.direct]}" | bc -l)"
  for who in nginx-cache nginx-proxy; do
    rn=$(echo "$gib / ${wall[$lay.$who]}" | bc -l)
    how="nginx proxy_cache, a miss"; [ $who = nginx-proxy ] && how="nginx plain proxy, no cache"
    printf '| same GET through %s vs direct from RGW (%s) | %.2f GiB/s | %.2f GiB/s | %.2f× | — |\n' \
      "$how" "$what" "$rn" "$rd" "$(echo "$rn / $rd" | bc -l)"
  done
  rn=$(echo "$gib / ${wall[$lay.nginx-cache]}" | bc -l)
  printf '| larderd miss vs nginx proxy_cache miss (%s) | %.2f GiB/s | %.2f GiB/s | %.2f× | — |\n' \
    "$what" "$rl" "$rn" "$(echo "$rl / $rn" | bc -l)"
done
printf '| 16 concurrent cold GETs of %s MiB: S3 body reads by the replica | %s | — | — | 1 |\n' "$SIZE_MIB" "$reads"
printf '| 64 MiB pinned ranges, 4 conns, from disk after the fill vs disk-only larderd | %.2f GiB/s | %.2f GiB/s | %.2f× | ≈ 1× |\n' "$best_t" "$best_o" "$(echo "$best_t / $best_o" | bc -l)"
