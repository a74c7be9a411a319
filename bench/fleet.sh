#!/usr/bin/env bash
# bench/fleet.sh — a fleet on one machine (issue 13, item 5).
#
# What it measures: 5 larderd replicas over one S3 bucket (a throw-away Ceph RGW started by
# scripts/s3-server.sh) serving 200 simulated CI clients for a few minutes, bounded in time
# (DURATION) and in count (MAX_OPS). Each client loops over a weighted mix:
#   get_large        `larder get` of a large object over all 5 replicas (the real CLI: parallel
#                    pinned range downloads, hedging, restarts), into a file with --no-sync
#   get_small        GET of a 4–64 KiB object from a random replica (Python http.client,
#                    keep-alive)
#   put_small        PUT of a new small key, or a new revision of a small key the client owns
#   overwrite_large  PUT of a new revision of the large key with the most downloads in flight
#                    (so keys are overwritten while downloaded), rate-limited and bounded
#   restore          `larder restore --no-sync` of a snapshot (tar + zstd of a 1000-file tree)
#   save             `larder save` of the other variant of a snapshot tree while others restore
# Every answer is checked (bench/fleet.py): each revision's bytes are a deterministic function
# of a seed in its first bytes, so a large body mixing two revisions, a corrupt or wrong-key
# body, an ETag that is not the one the revision was stored with, a restored tree that is
# neither saved variant, a small GET that went backwards on a replica or is older than the
# revalidation window allows — each is an error (goal 0). A download that ends on a clean 412
# ("object changed": the CLI restarted, or gave up after its bounded restarts and the client
# retried) is counted separately, not as an error.
#
# Reports (Markdown on stdout, everything raw in $WORK/results.json): ops, ops/s, MiB/s,
# p50/p99/max latency and errors per operation; S3 requests per client request (RGW's own
# request counter from its admin socket, and larderd's count); fills per cold object per
# replica (goal 1), from each replica's access log (revisions served from S3) and its fill log
# lines; peak RSS and CPU of each replica; CPU of the S3 server, the CLIs and the generator; the
# machine's cores and load. The generator, the 5 replicas, the CLIs and the S3 server share the
# machine's cores (2 on the reference machine); every figure is measured that way. The replicas
# run with access lines and fill lines on (LARDER_LOG, JSON), which the fills figure needs and
# which costs them some CPU; their data directories start empty, each large object is written
# through one replica (so it is warm there and cold on the other four).
#
# Run (as root the first time: scripts/s3-server.sh installs radosgw from Debian; needs
# python3 >= 3.11, cargo, curl, GNU time (installed when missing); about 1 minute of setup
# after the build, then DURATION; 6.5 GiB of disk used with the defaults, 9 GiB free required
# (checked), under target/bench-fleet, removed at the end unless KEEP=1):
#   bench/fleet.sh
#   CLIENTS=20 DURATION=20 bench/fleet.sh          # a quick check
# Knobs (environment): CLIENTS=200 DURATION=180 MAX_OPS=1000000 THINK_MS=50 (mean pause between
#   one client's ops, exponential) REPLICAS=5 REVALIDATE=2s S3_PORT=9230 BASE_PORT=18230
#   (replicas on BASE_PORT..+4) LARGE_COUNT=8 LARGE_MIN_MIB=64 LARGE_MAX_MIB=128
#   SMALL_COUNT=2000 SMALL_MIN_KIB=4 SMALL_MAX_KIB=64 SNAPSHOTS=2 SNAPSHOT_FILES=1000
#   W_GET_LARGE=10 W_GET_SMALL=70 W_PUT_SMALL=15 W_RESTORE=3 W_OVERWRITE_LARGE=1 W_SAVE=1 (mix
#   weights) LARGE_SLOTS=12 RESTORE_SLOTS=2 (most at once: bounds the CLIs' memory; an op drawn
#   while its slots are taken becomes a get_small) OVERWRITE_INTERVAL=8 OVERWRITE_MAX_MIB=1024
#   SAVE_INTERVAL=20 GET_CONCURRENCY=8 GET_CHUNK=8MiB SEED=1 LARDERD_ARGS="…" (extra server
#   flags) KEEP=1 (keep the work directory).
# Exit status: 0 if no error was found, 3 if any answer was wrong, 1 if the run itself failed.
# Cleanup: on any exit the replicas and the S3 server are stopped (trap).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export WORK=${WORK:-$REPO/target/bench-fleet}
S3_PORT=${S3_PORT:-9230}
CLIENTS=${CLIENTS:-200}
log() { echo "[$(date +%T)] $*" >&2; }

# 200 clients × 5 keep-alive connections, plus the replicas' own sockets and files.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((CLIENTS * 12 + 1024)) ] ||
  { echo "ulimit -n is $(ulimit -n): too low for $CLIENTS clients" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "needs python3 >= 3.11" >&2; exit 1; }

# GNU time measures each larder CLI's peak RSS
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq --no-install-recommends time >&2; }

log "building release binaries"
(cd "$REPO" && cargo build --release -q -p larderd -p larder-client)
export LARDERD_BIN=$REPO/target/release/larderd LARDER_BIN=$REPO/target/release/larder

gen=
cleanup() {
  status=$?
  # the generator stops its CLIs and the replicas itself on SIGTERM; the pid file is the backstop
  if [ -n "$gen" ]; then kill -TERM "$gen" 2>/dev/null || true; wait "$gen" 2>/dev/null || true; fi
  if [ -f "$WORK/replicas.pids" ]; then
    while read -r p; do kill "$p" 2>/dev/null || true; done < "$WORK/replicas.pids"
  fi
  [ -f "$WORK/s3/run/s3.pid" ] && "$REPO/scripts/s3-server.sh" stop "$WORK/s3" >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" != 1 ] && [ -d "$WORK" ]; then
    # keep the report and the server logs' warnings; drop data, access logs and trees
    for f in "$WORK"/replica*.log; do
      [ -f "$f" ] && grep -v '"larderd::access"' "$f" | grep -v '"fill ended"' > "$f.warn" || true
    done
    rm -rf "$WORK"/replica? "$WORK"/replica*.log "$WORK/s3" "$WORK/trees" "$WORK/dl" \
      "$WORK/restore" "$WORK/tmp"
  fi
  exit $status
}
# Disk: every replica ends up with a copy of each large object, and RGW holds them plus every
# overwrite and small PUT (bodies replaced during the run stay until the reaper's grace ends).
need_mib=$(( (${REPLICAS:-5} + 1) * ${LARGE_COUNT:-8} * ${LARGE_MAX_MIB:-128} + ${OVERWRITE_MAX_MIB:-1024} + 2048 ))
mkdir -p "$WORK"
free_mib=$(df -Pm "$WORK" | awk 'NR==2 {print $4}')
[ "$free_mib" -ge "$need_mib" ] ||
  { echo "needs about $need_mib MiB free under $WORK, has $free_mib" >&2; exit 1; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK"
rm -f "$WORK/replicas.pids" "$WORK/results.json"

log "starting the S3 server (Ceph RGW) on 127.0.0.1:$S3_PORT"
# (assigned first: a failing start must stop the script, which `eval "$(…)"` would not)
s3env=$(S3_STORE_SIZE=${S3_STORE_SIZE:-21474836480} "$REPO/scripts/s3-server.sh" \
  --port "$S3_PORT" --data-dir "$WORK/s3" --bucket fleet)
set -a
eval "$s3env"
set +a
export S3_DIR=$WORK/s3

# In the background and waited for, so that a signal reaches the trap at once.
python3 "$REPO/bench/fleet.py" &
gen=$!
wait "$gen"
