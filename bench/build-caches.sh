#!/usr/bin/env bash
# bench/build-caches.sh — Bazel's remote cache served by larderd vs Bazel's own --disk_cache
# (issue 14, item 7), and larderd's request rate for the objects build caches move.
#
# What it measures, on one machine, over loopback:
#   Bazel rows: a generated workspace (GENRULES genrules in chains of 10, each writing a few
#   KiB; CCLIBS cc_library targets of one C file each, built with the local gcc; one cc_binary
#   linking them all) built fully from a cache: `bazel clean`, then `bazel build //...` with
#     larder   --remote_cache=http://127.0.0.1:PORT/bazel/bench   (release larderd, disk tier;
#              action results checked, i.e. every hit also looks up the blobs it names)
#     disk     --disk_cache=DIR                                   (Bazel's own local cache)
#   One Bazel server stays up for every row (no JVM start-up in the times), both caches are
#   filled by one build with both flags first, and each row runs REPS times in alternating
#   order; the median wall time is kept. Every measured build must report all its processes
#   as remote cache hits (the disk cache counts as one in Bazel 2.1), else the script fails.
#   Target (issue 14): larder within 1.3x of disk.
#   Request rows: wrk GETs of /bazel/bench/cas/{sha256} for COUNT blobs of each size in SIZES
#   (the sizes ccache and Bazel move: small outputs, object files, archives), and of COUNT
#   action results naming two blobs each (one 16 KiB, one 1 KiB: a compile's .o and .d), which
#   costs larderd three reads per request. wrk -t2 -c$CONNS for DURATION seconds each.
#
# Bazel 2.1.0 from LARDER_BAZEL, else from scripts/install-npm-tools.sh; offline (rules_cc and
# rules_java point at local stubs, as in crates/larderd/tests/build_caches.rs). larderd, wrk,
# Bazel and gcc share the machine's cores: on a 2-core machine the numbers say how the two
# caches compare, not what a CI fleet sees.
#
# How to run (from anywhere; builds larderd --release; installs wrk from Debian if missing,
# which needs root; ~10 minutes on 2 cores, most of it the first build that fills the caches):
#   bench/build-caches.sh
# Knobs (environment): REPS=5 GENRULES=200 CCLIBS=100 JOBS=8 SIZES="1024 16384 262144"
#   COUNT=500 CONNS=32 DURATION=10 LARDER_PORT=18097 KEEP=0 (1 keeps target/bench-build-caches)
#   LARDERD=<binary> (a given build instead of the tree's, e.g. to compare two)
# Prints a Markdown table on stdout (progress on stderr) and writes it with the raw per-run
# numbers to target/bench-build-caches/results.md. Everything it starts is stopped on exit.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
WORK=$REPO/target/bench-build-caches
REPS=${REPS:-5}
GENRULES=${GENRULES:-200}
CCLIBS=${CCLIBS:-100}
JOBS=${JOBS:-8}
SIZES=${SIZES:-1024 16384 262144}
COUNT=${COUNT:-500}
CONNS=${CONNS:-32}
DURATION=${DURATION:-10}
PORT=${LARDER_PORT:-18097}
KEEP=${KEEP:-0}
URL=http://127.0.0.1:$PORT
NS=bench

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '\nbuild-caches: FAILED: %s\n' "$*" >&2; exit 1; }

BAZEL=${LARDER_BAZEL:-}
if [ -z "$BAZEL" ]; then
  eval "$("$REPO/scripts/install-npm-tools.sh")"
  BAZEL=${LARDER_BAZEL:-}
fi
[ -x "$BAZEL" ] || die "no Bazel binary (LARDER_BAZEL, or scripts/install-npm-tools.sh)"
# Only what this script sets may reach larderd.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^LARDER_' || true)
command -v gcc >/dev/null || die "gcc is missing (apt-get install gcc libc6-dev)"
command -v python3 >/dev/null || die "python3 is missing"
if ! command -v wrk >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "wrk is missing (apt-get install wrk)"
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk; } >&2
fi

rm -rf "$WORK"
mkdir -p "$WORK/home"
LARDERD_PID=""
cleanup() {
  if [ -d "$WORK/ws" ]; then
    (cd "$WORK/ws" && HOME=$WORK/home "$BAZEL" --output_user_root="$WORK/bazel-root" \
      --nohome_rc --nosystem_rc shutdown >/dev/null 2>&1) || true
  fi
  if [ -n "$LARDERD_PID" ]; then kill "$LARDERD_PID" 2>/dev/null || true; wait "$LARDERD_PID" 2>/dev/null || true; fi
  if [ "$KEEP" != 1 ]; then rm -rf "$WORK/ws" "$WORK/bazel-root" "$WORK/disk-cache" "$WORK/larder-data" "$WORK/home"; fi
}
trap cleanup EXIT

LARDERD=${LARDERD:-}
if [ -z "$LARDERD" ]; then
  log "building larderd (release)"
  (cd "$REPO" && cargo build --release --locked -p larderd >&2)
  LARDERD=$REPO/target/release/larderd
fi
"$LARDERD" --listen "127.0.0.1:$PORT" --data-dir "$WORK/larder-data" \
  >"$WORK/larderd.out" 2>"$WORK/larderd.log" &
LARDERD_PID=$!
for _ in $(seq 100); do
  curl -fs "$URL/_readiness" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "$URL/_readiness" >/dev/null || die "larderd did not start: $(tail -3 "$WORK/larderd.log")"

log "generating the workspace: $GENRULES genrules, $CCLIBS cc_library, one cc_binary"
ws=$WORK/ws
mkdir -p "$ws/stubs/rules_cc/cc" "$ws/stubs/rules_java/java" "$ws/lib"
cat >"$ws/WORKSPACE" <<'EOF'
local_repository(name = "rules_cc", path = "stubs/rules_cc")
local_repository(name = "rules_java", path = "stubs/rules_java")
EOF
touch "$ws/stubs/rules_cc/WORKSPACE" "$ws/stubs/rules_cc/cc/BUILD" \
  "$ws/stubs/rules_java/WORKSPACE" "$ws/stubs/rules_java/java/BUILD"
for rule in cc_binary cc_library cc_toolchain cc_toolchain_suite; do
  printf 'def %s(**kwargs):\n    native.%s(**kwargs)\n\n' "$rule" "$rule"
done >"$ws/stubs/rules_cc/cc/defs.bzl"
for rule in java_binary java_import java_library java_runtime java_toolchain; do
  printf 'def %s(**kwargs):\n    native.%s(**kwargs)\n\n' "$rule" "$rule"
done >"$ws/stubs/rules_java/java/defs.bzl"
{
  for i in $(seq 0 $((GENRULES - 1))); do
    if [ $((i % 10)) -eq 0 ]; then
      printf 'genrule(name = "g%d", outs = ["g%d.txt"], cmd = "seq 1 %d > $@")\n' "$i" "$i" $((300 + i))
    else
      printf 'genrule(name = "g%d", srcs = [":g%d"], outs = ["g%d.txt"], cmd = "cat $< > $@ && seq %d >> $@")\n' \
        "$i" $((i - 1)) "$i" $((50 + i))
    fi
  done
  deps=""
  for i in $(seq 0 $((CCLIBS - 1))); do
    printf 'cc_library(name = "lib%d", srcs = ["lib/lib%d.c"], hdrs = ["lib/lib%d.h"])\n' "$i" "$i" "$i"
    deps="$deps\":lib$i\", "
  done
  printf 'cc_binary(name = "main", srcs = ["main.c"], deps = [%s])\n' "$deps"
} >"$ws/BUILD"
{
  echo '#include <stdio.h>'
  for i in $(seq 0 $((CCLIBS - 1))); do echo "#include \"lib/lib$i.h\""; done
  echo 'int main(void) { long s = 0;'
  for i in $(seq 0 $((CCLIBS - 1))); do echo "  s += lib${i}_sum($i);"; done
  echo '  printf("%ld\n", s); return 0; }'
} >"$ws/main.c"
for i in $(seq 0 $((CCLIBS - 1))); do
  echo "long lib${i}_sum(long n);" >"$ws/lib/lib$i.h"
  cat >"$ws/lib/lib$i.c" <<EOF
#include "lib/lib$i.h"
static long table[64];
long lib${i}_sum(long n) {
  long s = 0;
  for (long k = 0; k < 64; k++) table[k] = (k * $((i + 3))) ^ n;
  for (long k = 0; k < 64; k++) s += table[k] % $((i + 7));
  return s;
}
EOF
done

bazel() {
  (cd "$ws" && HOME=$WORK/home "$BAZEL" --output_user_root="$WORK/bazel-root" \
    --max_idle_secs=900 --nohome_rc --nosystem_rc "$@")
}
REMOTE=(--remote_cache="$URL/bazel/$NS")
DISK=(--disk_cache="$WORK/disk-cache")
COMMON=(--color=no --curses=no --jobs="$JOBS")

log "filling both caches (one build with both flags)"
bazel build "${COMMON[@]}" "${REMOTE[@]}" "${DISK[@]}" //... >"$WORK/fill.log" 2>&1 ||
  die "the filling build failed: $(tail -5 "$WORK/fill.log")"
grep ' processes' "$WORK/fill.log" | tail -1 >&2

# One measured build: prints "SECONDS TOTAL HITS".
measure() {
  local mode=$1 out=$WORK/run.log
  bazel clean >/dev/null 2>&1
  local flags=("${REMOTE[@]}")
  [ "$mode" = disk ] && flags=("${DISK[@]}")
  local t0 t1
  t0=$(date +%s.%N)
  bazel build "${COMMON[@]}" "${flags[@]}" //... >"$out" 2>&1 || die "$mode build failed: $(tail -5 "$out")"
  t1=$(date +%s.%N)
  local line total hits
  line=$(grep ' processes' "$out" | tail -1)
  total=$(sed -E 's/^INFO: ([0-9]+) processes.*/\1/' <<<"$line")
  hits=$(grep -oE '[0-9]+ remote cache hit' <<<"$line" | cut -d' ' -f1)
  [ -n "$total" ] && [ "${hits:-0}" = "$total" ] || die "$mode: not every process was a cache hit: $line"
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') $total $hits"
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

raw=$WORK/raw.txt
: >"$raw"
for rep in $(seq "$REPS"); do
  order="larder disk"
  [ $((rep % 2)) -eq 0 ] && order="disk larder"
  for mode in $order; do
    result=$(measure "$mode")
    echo "$mode $rep $result" >>"$raw"
    log "rep $rep $mode: $result (seconds, processes, hits)"
  done
done
larder_s=$(awk '$1 == "larder" { print $3 }' "$raw" | median)
disk_s=$(awk '$1 == "disk" { print $3 }' "$raw" | median)
processes=$(awk 'NR == 1 { print $4 }' "$raw")
ratio=$(awk -v a="$larder_s" -v b="$disk_s" 'BEGIN { printf "%.2f", a / b }')

log "storing $COUNT blobs of each size and $COUNT action results for the request rows"
python3 - "$URL" "$NS" "$COUNT" "$WORK" $SIZES <<'EOF'
import hashlib, http.client, os, sys
url, ns, count, work, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], [int(s) for s in sys.argv[5:]]
host, port = url.removeprefix("http://").split(":")
conn = http.client.HTTPConnection(host, int(port))

def put(path, body):
    conn.request("PUT", path, body=body)
    r = conn.getresponse()
    r.read()
    assert r.status in (200, 201), (path, r.status)

def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)

def field(tag, payload):
    return varint(tag << 3 | 2) + varint(len(payload)) + payload

def digest(data):
    return field(1, hashlib.sha256(data).hexdigest().encode()) + varint(2 << 3) + varint(len(data))

def blob(size, n):
    seed = f"{size}/{n}/".encode()
    return (seed * (size // len(seed) + 1))[:size]

for size in sizes:
    with open(f"{work}/paths-cas-{size}", "w") as paths:
        for n in range(count):
            data = blob(size, n)
            path = f"/bazel/{ns}/cas/{hashlib.sha256(data).hexdigest()}"
            put(path, data)
            paths.write(path + "\n")
with open(f"{work}/paths-ac", "w") as paths:
    for n in range(count):
        obj, dep = blob(16384, n + count), blob(1024, n + count)
        for data in (obj, dep):
            put(f"/bazel/{ns}/cas/{hashlib.sha256(data).hexdigest()}", data)
        result = field(2, field(1, f"bazel-out/k8-opt/bin/_objs/o{n}.o".encode()) + field(2, digest(obj)))
        result += field(2, field(1, f"bazel-out/k8-opt/bin/_objs/o{n}.d".encode()) + field(2, digest(dep)))
        path = f"/bazel/{ns}/ac/{hashlib.sha256(f'action {n}'.encode()).hexdigest()}"
        put(path, result)
        paths.write(path + "\n")
EOF

# One wrk row: prints "REQ_PER_S MIB_PER_S P50_MS P99_MS".
rate() {
  local paths=$1 out line
  out=$(BENCH_PATHS=$paths wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$SCRIPT_DIR/wrk-paths.lua" "$URL" 2>&1)
  line=$(grep '^WRKRESULT ' <<<"$out") || die "no result line from wrk: $out"
  declare -A r
  for kv in ${line#WRKRESULT }; do r[${kv%%=*}]=${kv#*=}; done
  local errors=$((r[err_connect] + r[err_read] + r[err_write] + r[err_status] + r[err_timeout]))
  [ "$errors" -eq 0 ] || die "wrk saw $errors errors on $paths: $line"
  awk -v n="${r[requests]}" -v b="${r[bytes]}" -v us="${r[duration_us]}" -v p50="${r[p50_us]}" -v p99="${r[p99_us]}" \
    'BEGIN { printf "%.0f %.1f %.2f %.2f", n / (us / 1e6), b / (us / 1e6) / 1048576, p50 / 1000, p99 / 1000 }'
}

rows=()
for size in $SIZES; do
  log "wrk: cas blobs of $size bytes"
  rows+=("| \`GET /bazel/{ns}/cas/…\`, $size B | $(rate "$WORK/paths-cas-$size" | awk '{ printf "%s | %s | %s | %s", $1, $2, $3, $4 }') |")
done
log "wrk: action results naming two blobs"
rows+=("| \`GET /bazel/{ns}/ac/…\` (2 blobs looked up) | $(rate "$WORK/paths-ac" | awk '{ printf "%s | %s | %s | %s", $1, $2, $3, $4 }') |")

{
  echo "## Bazel: a fully cached build from larder vs from --disk_cache"
  echo
  echo "$GENRULES genrules + $CCLIBS cc_library + 1 cc_binary ($processes processes, all cache hits), --jobs=$JOBS, median of $REPS, $(nproc) cores"
  echo
  echo "| cache | median wall time (s) |"
  echo "|---|---|"
  echo "| larder (\`--remote_cache\`, loopback) | $larder_s |"
  echo "| Bazel's \`--disk_cache\` | $disk_s |"
  echo "| **ratio larder / disk** (target ≤ 1.3) | **$ratio** |"
  echo
  echo "## larderd request rate, wrk -t2 -c$CONNS, ${DURATION}s, $COUNT distinct keys per row"
  echo
  echo "| request | req/s | MiB/s | p50 ms | p99 ms |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$WORK/results.md"
{
  echo
  echo "Raw builds (mode, rep, seconds, processes, hits):"
  echo
  sed 's/^/    /' "$raw"
} >>"$WORK/results.md"
