#!/usr/bin/env bash
# bench/put-vs-nginx.sh — uploading a big object to larderd's disk tier against nginx's WebDAV
# PUT of the same bytes, over loopback, with the same client (curl -T), in the same run.
#
# Per rep, alternating: one PUT of SIZE_MIB to larderd (disk tier only) and one to nginx
# (`dav_methods PUT`, body spooled to client_body_temp_path and renamed into place), each
# object deleted afterwards. Reports the median throughput of each and the ratio, and each
# server's CPU per GiB (utime+stime of all its threads, from /proc). nginx neither hashes nor
# fsyncs the body; larderd does both (blake3 ETag, durable before the 201), so the CPU row
# compares different work on purpose: it is what each costs for an upload.
#
# Client and servers share the machine's cores (on a 2-core machine: curl, the server and the
# kernel's copies all on the same two), so compare ratios, not absolute figures.
#
# Run as root (installs nginx-light and bc when missing; ~2 minutes):
#   bench/put-vs-nginx.sh
# Knobs: REPS=5 SIZE_MIB=1024 LARDER_PORT=18280 NGINX_PORT=18281
#   LARDERD=path/to/larderd (another build, for an A/B; default: build this checkout)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$REPO/target/bench-put
REPS=${REPS:-5}
SIZE_MIB=${SIZE_MIB:-1024}
LPORT=${LARDER_PORT:-18280}
NPORT=${NGINX_PORT:-18281}
log() { echo "[$(date +%T)] $*" >&2; }

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v bc >/dev/null || need+=(bc)
if ((${#need[@]})); then apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >&2; fi
if [ -z "${LARDERD:-}" ]; then
  (cd "$REPO" && cargo build --release -q -p larderd)
  LARDERD=$REPO/target/release/larderd
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK/www" "$WORK/nginx-tmp" "$WORK/logs"
chmod a+rwx "$WORK/www" "$WORK/nginx-tmp" # nginx workers drop root

"$LARDERD" --listen "127.0.0.1:$LPORT" --data-dir "$WORK/larder" \
  >"$WORK/larderd.out" 2>/dev/null &
SERVER=$!
pids+=("$SERVER")
cat >"$WORK/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $WORK/nginx.pid;
events {}
http {
    access_log off;
    client_body_temp_path $WORK/nginx-tmp;
    client_max_body_size 0;
    client_body_buffer_size 1m;
    server {
        listen 127.0.0.1:$NPORT;
        root $WORK/www;
        location / { dav_methods PUT DELETE; create_full_put_path on; }
    }
}
EOF
nginx -p "$WORK" -c "$WORK/nginx.conf" -e "$WORK/logs/error.log" >"$WORK/nginx.out" 2>&1 &
NGINX=$!
pids+=("$NGINX")
for _ in $(seq 100); do
  grep -q listening "$WORK/larderd.out" 2>/dev/null && curl -s -o /dev/null "http://127.0.0.1:$NPORT/" && break
  sleep 0.1
done

head -c "$((SIZE_MIB << 20))" /dev/urandom >"$WORK/body"
cat "$WORK/body" >/dev/null # in the page cache for both

# CPU ticks of a process and its children's threads (nginx: master and workers).
ticks() {
  local sum=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    for t in /proc/"$p"/task/*/stat; do
      sum=$((sum + $(awk '{print $14 + $15}' "$t" 2>/dev/null || echo 0)))
    done
  done
  echo "$sum"
}
hz=$(getconf CLK_TCK)
put() { # server-pid url -> "seconds ticks"
  local before after secs
  before=$(ticks "$1")
  secs=$(curl -sf -T "$WORK/body" -o /dev/null -w '%{time_total}' "$2")
  after=$(ticks "$1")
  curl -sf -X DELETE -o /dev/null "$2"
  echo "$secs $((after - before))"
}

lsecs=() nsecs=() lticks=() nticks=()
for r in $(seq "$REPS"); do
  read -r s t < <(put "$SERVER" "http://127.0.0.1:$LPORT/api/v1/object/bench/put$r")
  lsecs+=("$s") lticks+=("$t"); log "rep $r larderd ${s}s ${t} ticks"
  read -r s t < <(put "$NGINX" "http://127.0.0.1:$NPORT/put$r")
  nsecs+=("$s") nticks+=("$t"); log "rep $r nginx ${s}s ${t} ticks"
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
gib=$(echo "$SIZE_MIB / 1024" | bc -l)
ls=$(median "${lsecs[@]}"); ns=$(median "${nsecs[@]}")
lt=$(median "${lticks[@]}"); nt=$(median "${nticks[@]}")
lr=$(echo "$gib / $ls" | bc -l); nr=$(echo "$gib / $ns" | bc -l)
lc=$(echo "$lt / $hz / $gib" | bc -l); nc=$(echo "$nt / $hz / $gib" | bc -l)
echo "Run: $(date -u); $(nproc) cores; kernel $(uname -r); medians of $REPS; client and servers share the cores"
echo
echo "| row | larderd | nginx (WebDAV PUT) | ratio |"
echo "| --- | ---: | ---: | ---: |"
printf '| %s MiB PUT, 1 connection: throughput | %.2f GiB/s | %.2f GiB/s | %.2f× |\n' "$SIZE_MIB" "$lr" "$nr" "$(echo "$lr / $nr" | bc -l)"
printf '| server CPU per GiB uploaded | %.2f s | %.2f s | %.2f |\n' "$lc" "$nc" "$(echo "$lc / $nc" | bc -l)"
