#!/usr/bin/env bash
# bench/load-test.sh — bounded load test of larderd (issue 5, "Load").
#
# Runs the larder-load generator (bench/load) against a release larderd, and nginx as the
# reference, in these configurations:
#   reads   larderd, disk tier only, the mix without PUTs (the side-by-side with nginx)
#   nginx   nginx serving the same objects as files (sendfile, open_file_cache), the same mix
#   disk    larderd, disk tier only, the full mix with PUTs
#   tiered  larderd, disk tier over S3 (a throw-away Ceph RGW from scripts/s3-server.sh, not on
#           port 9100), the full mix
# Each run: 500 connections (one per worker) for 2 minutes, mixing full GETs, pinned range GETs,
# HEADs, conditional GETs and (disk, tiered) PUTs that overwrite keys being read; every answer
# is checked against a model of the objects (see bench/load/src/main.rs), and the server's RSS
# is sampled. Both servers log one access line per request (larderd's default; nginx with a
# 64 KiB buffer), as they would in production. Prints one table per run, a summary, and the
# p99 ratios larderd (reads) / nginx; exits non-zero if any answer was unexpected.
#
# Run from anywhere (as root for the S3 server's first install; ~6 minutes with the defaults):
#   bench/load-test.sh
# Knobs: DURATION=2m CONNECTIONS=500 CONFIGS="reads nginx disk tiered" LARDER_PORT=18280 S3_PORT=9500
#        LOAD_ARGS="--token T …" (extra generator flags), LARDERD_ARGS="…" (extra server flags),
#        LARDERD=<binary> (a given larderd build instead of the tree's).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$REPO/target/bench-load
DURATION=${DURATION:-2m}
CONNECTIONS=${CONNECTIONS:-500}
CONFIGS=${CONFIGS:-reads nginx disk tiered}
READ_MIX=20,35,15,20,0
LPORT=${LARDER_PORT:-18280}
S3_PORT=${S3_PORT:-9500}
log() { echo "[$(date +%T)] $*" >&2; }

# 500 client sockets plus 500 server sockets, plus the server's open revisions.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((2 * CONNECTIONS + 256)) ] ||
  { echo "ulimit -n is $(ulimit -n): too low for $CONNECTIONS connections" >&2; exit 1; }

command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light >&2; }
(cd "$REPO" && cargo build --release -q -p larderd -p larder-load)
BIN=${LARDERD:-$REPO/target/release/larderd}
LOAD=$REPO/target/release/larder-load

server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  [ -f "$WORK/s3/run/s3.pid" ] && "$REPO/scripts/s3-server.sh" stop "$WORK/s3" >/dev/null 2>&1 || true
}
trap cleanup EXIT
mkdir -p "$WORK"

start_larderd() { # data-dir [args...]
  local dir=$1; shift
  rm -rf "$dir"
  # shellcheck disable=SC2086 # LARDERD_ARGS is a list of words
  "$BIN" --listen "127.0.0.1:$LPORT" --data-dir "$dir" ${LARDERD_ARGS:-} "$@" \
    >"$dir.out" 2>"$dir.err" &
  server=$!
  for _ in $(seq 100); do grep -q "listening" "$dir.out" 2>/dev/null && return 0; sleep 0.1; done
  echo "larderd did not start" >&2; cat "$dir.err" >&2; exit 1
}

stop_server() {
  kill "$server"; wait "$server" 2>/dev/null || true
  # nginx is not our child: wait until its master is gone and the port is free.
  for _ in $(seq 100); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
  server=
}

start_nginx() { # document-root
  local root=$1 conf=$WORK/nginx.conf
  rm -rf "$root" "$WORK/nginx.pid" && mkdir -p "$root" "$WORK/nginx-tmp"
  cat >"$conf" <<NGINX
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log $WORK/nginx-access.log combined buffer=64k;
  client_body_temp_path $WORK/nginx-tmp;
  sendfile on; tcp_nopush on;
  open_file_cache max=1000 inactive=60s; open_file_cache_valid 60s;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$LPORT; root $root; }
}
NGINX
  nginx -c "$conf"
  for _ in $(seq 50); do [ -s "$WORK/nginx.pid" ] && break; sleep 0.1; done
  server=$(cat "$WORK/nginx.pid")
}

status=0
for config in $CONFIGS; do
  load_args=()
  case $config in
    disk) args=() ;;
    reads) args=(); load_args=(--mix "$READ_MIX") ;;
    nginx) load_args=(--mix "$READ_MIX" --static-root "$WORK/www") ;;
    tiered)
      if [ ! -f "$WORK/s3/s3.env" ] || ! kill -0 "$(cat "$WORK/s3/run/s3.pid" 2>/dev/null)" 2>/dev/null; then
        set -a
        eval "$("$REPO/scripts/s3-server.sh" --port "$S3_PORT" --data-dir "$WORK/s3" --bucket load)"
        set +a
      fi
      args=(--s3-bucket load --s3-prefix "run-$(date +%s)") ;;
    *) echo "unknown configuration $config (reads, nginx, disk, tiered)" >&2; exit 2 ;;
  esac
  rm -f "$WORK/$config.json"
  if [ "$config" = nginx ]; then
    start_nginx "$WORK/www"
    errlog=$WORK/nginx.err
    # Its work is done by the workers; the master's RSS and CPU say nothing.
    sample=()
  else
    start_larderd "$WORK/larder-$config" "${args[@]}"
    errlog=$WORK/larder-$config.err
    sample=(--pid "$server")
  fi
  log "$config: server pid $server; $CONNECTIONS connections for $DURATION"
  # shellcheck disable=SC2086 # LOAD_ARGS is a list of words
  if ! "$LOAD" --url "http://127.0.0.1:$LPORT" --duration "$DURATION" --connections "$CONNECTIONS" \
      "${sample[@]}" --label "$config" --json "$WORK/$config.json" "${load_args[@]}" ${LOAD_ARGS:-} | tee "$WORK/$config.md"; then
    status=1
  fi
  if [ "$config" != nginx ]; then
    # What the server keeps once the load is gone (it should hand the burst's memory back).
    sleep 15
    rss_after=$(awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$server/status")
    log "$config: RSS 15 s after the load: $rss_after MiB"
    echo "$rss_after" >"$WORK/$config.rss-after"
  fi
  if grep -Eq "ERROR|panicked|\[(crit|alert|emerg)\]" "$errlog"; then
    log "$config: server errors (first 20 lines of $errlog):"
    grep -E "ERROR|panicked|\[(crit|alert|emerg)\]" "$errlog" | head -20 >&2
  fi
  stop_server
  rm -rf "$WORK/larder-$config" "$WORK/www"
  echo
done

echo "Run: $(date -u); $(nproc) cores; kernel $(uname -r); commit $(git -C "$REPO" rev-parse --short HEAD)"
echo
python3 - "$WORK" $CONFIGS <<'EOF'
import json, sys
work, configs = sys.argv[1], sys.argv[2:]
kinds = ["GET", "range GET (If-Match)", "HEAD", "GET If-None-Match", "PUT (overwrite)"]
print("| configuration | " + " | ".join(f"{k} p50 / p99 ms" for k in kinds)
      + " | req/s | MiB/s out of larderd | RSS peak (VmHWM) | RSS 15 s after | CPU % server / generator / other | unexpected |")
print("| --- |" + " ---: |" * (len(kinds) + 6))
for c in configs:
    try:
        r = json.load(open(f"{work}/{c}.json"))
    except OSError:
        print(f"| {c} | (no result) |")
        continue
    cells = [f"{r['kinds'][k]['p50_ms']:.1f} / {r['kinds'][k]['p99_ms']:.1f}" if r['kinds'].get(k, {}).get('count') else "—"
             for k in kinds]
    cpu = r["cpu_pct"]
    try:
        after = open(f"{work}/{c}.rss-after").read().strip() + " MiB"
    except OSError:
        after = "?"

    other = max(0, cpu["machine"] - cpu["server"] - cpu["generator"])
    print(f"| {c} | " + " | ".join(cells)
          + f" | {r['req_per_s']:.0f} | {r['mib_per_s_in']:.0f} | {r['rss_hwm_mib']:.0f} MiB | {after}"
          + f" | {cpu['server']:.0f} / {cpu['generator']:.0f} / {other:.0f} | {r['unexpected']} |")

if "reads" in configs and "nginx" in configs:
    try:
        l, n = (json.load(open(f"{work}/{c}.json")) for c in ("reads", "nginx"))
    except OSError:
        sys.exit(0)
    print()
    print("| larderd (reads) vs nginx, same mix, same generator | larderd p50 / p99 ms | nginx p50 / p99 ms | p99 ratio larderd / nginx (target ≤ 1.2) |")
    print("| --- | ---: | ---: | ---: |")
    for k in kinds[:4]:
        a, b = l["kinds"][k], n["kinds"][k]
        print(f"| {k} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f}"
              f" | {a['p99_ms'] / b['p99_ms']:.2f} |")
    print(f"| requests/s | {l['req_per_s']:.0f} | {n['req_per_s']:.0f} | {l['req_per_s'] / n['req_per_s']:.2f}× nginx's |")
EOF
exit $status
