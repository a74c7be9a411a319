#!/usr/bin/env bash
# bench/ccache-rebuild.sh — a ccache rebuild of a real C project served by larderd vs served by a
# warm local ccache directory (issue 14, item 7).
#
# The project: the zstd library (lib/, about 40 C files) as cargo fetched it for the zstd-sys
# crate this workspace depends on, compiled file by file with `ccache gcc -O2 -c`, JOBS at a
# time. Rows, each the median of REPS rebuilds of the whole library:
#   local    CCACHE_DIR warm (filled by the first build), no remote storage: ccache's own hits
#   larder   an empty CCACHE_DIR every time, remote_storage=http://…/api/v1/object/ccache
#            (release larderd, disk tier): every object comes from larder
#   none     plain gcc, no ccache: what a cache saves
# Every larder rebuild must report as many remote hits as files and produce object files
# identical to the first build's, else the script fails. larderd, ccache and gcc share the
# machine's cores (2 here): the ratio says how the two caches compare on one machine.
#
# How to run (from anywhere; builds larderd --release; installs ccache and gcc from Debian if
# missing, which needs root; about 3 minutes on 2 cores):
#   bench/ccache-rebuild.sh
# Knobs (environment): REPS=5 JOBS=4 LARDER_PORT=18380. Prints a Markdown table on stdout.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$REPO/target/bench-ccache
REPS=${REPS:-5}
JOBS=${JOBS:-4}
PORT=${LARDER_PORT:-18380}
log() { echo "[$(date +%T)] $*" >&2; }

missing=()
command -v ccache >/dev/null || missing+=(ccache)
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
[ ${#missing[@]} -eq 0 ] || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; }
(cd "$REPO" && cargo build --release -q -p larderd && cargo fetch -q)
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/zstd-sys-*/zstd/lib 2>/dev/null | sort | tail -1)
[ -d "$SRC" ] || { echo "zstd sources not found under ~/.cargo/registry (cargo fetch)" >&2; exit 1; }
FILES=$(cd "$SRC" && find . -name '*.c' | sort)
NFILES=$(echo "$FILES" | wc -l)

server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null || true; }
trap cleanup EXIT
rm -rf "$WORK" && mkdir -p "$WORK"
LARDER_LOG=warn "$REPO/target/release/larderd" --listen "127.0.0.1:$PORT" --data-dir "$WORK/larder" \
  >"$WORK/larderd.out" 2>"$WORK/larderd.err" &
server=$!
for _ in $(seq 100); do grep -q listening "$WORK/larderd.out" 2>/dev/null && break; sleep 0.1; done
REMOTE=http://127.0.0.1:$PORT/api/v1/object/ccache

# build OUT_DIR [env...]: compiles every file into OUT_DIR; prints the wall time in seconds.
build() {
  local out=$1; shift
  rm -rf "$out" && mkdir -p "$out"
  local t0 t1
  t0=$(date +%s.%N)
  echo "$FILES" | (cd "$SRC" && env "$@" xargs -P "$JOBS" -I{} sh -c \
    'o="$0/$(echo "{}" | tr / _).o"; $CC -O2 -DXXH_NAMESPACE=ZSTD_ -Icommon -c "{}" -o "$o"' "$out")
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}
ccache_env=(CCACHE_BASEDIR="$SRC" CCACHE_NOHASHDIR=1 CCACHE_COMPILERCHECK=content)

log "first build: fills the local directory and larder ($NFILES files from $SRC)"
build "$WORK/ref" CC="ccache gcc" CCACHE_DIR="$WORK/ccache-warm" CCACHE_REMOTE_STORAGE="$REMOTE" "${ccache_env[@]}" >/dev/null

declare -a T_LOCAL=() T_LARDER=() T_NONE=()
for rep in $(seq "$REPS"); do
  T_LOCAL+=("$(build "$WORK/out" CC="ccache gcc" CCACHE_DIR="$WORK/ccache-warm" CCACHE_REMOTE_STORAGE= "${ccache_env[@]}")")
  diff -r -q "$WORK/ref" "$WORK/out" >/dev/null || { echo "local rebuild: object files differ" >&2; exit 1; }
  rm -rf "$WORK/ccache-empty"
  T_LARDER+=("$(build "$WORK/out" CC="ccache gcc" CCACHE_DIR="$WORK/ccache-empty" CCACHE_REMOTE_STORAGE="$REMOTE" "${ccache_env[@]}")")
  diff -r -q "$WORK/ref" "$WORK/out" >/dev/null || { echo "larder rebuild: object files differ" >&2; exit 1; }
  hits=$(CCACHE_DIR="$WORK/ccache-empty" ccache --print-stats | awk -F'\t' '$1=="remote_storage_hit"{print $2}')
  [ "$hits" = "$NFILES" ] || { echo "larder rebuild: $hits remote hits for $NFILES files" >&2; exit 1; }
  T_NONE+=("$(build "$WORK/out" CC=gcc)")
  log "rep $rep: local ${T_LOCAL[-1]} s, larder ${T_LARDER[-1]} s, no cache ${T_NONE[-1]} s"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
L=$(printf '%.3f' "$(median "${T_LOCAL[@]}")")
R=$(printf '%.3f' "$(median "${T_LARDER[@]}")")
N=$(printf '%.3f' "$(median "${T_NONE[@]}")")
echo "Run: $(date -u); $(nproc) cores; commit $(git -C "$REPO" rev-parse --short HEAD); $NFILES files of $(basename "$(dirname "$(dirname "$SRC")")"), -j$JOBS, median of $REPS"
echo
echo "| rebuild of the zstd library | wall time | vs warm local ccache |"
echo "| --- | ---: | ---: |"
echo "| ccache, warm local directory | $L s | 1.00× |"
printf '| ccache, empty local directory, every object from larder | %s s | %.2f× |\n' "$R" "$(echo "$R / $L" | bc -l)"
printf '| gcc without ccache | %s s | %.2f× |\n' "$N" "$(echo "$N / $L" | bc -l)"
