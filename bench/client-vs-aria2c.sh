#!/usr/bin/env bash
# bench/client-vs-aria2c.sh — the `larder` client against aria2c, curl and curl|zstd|tar (issue 4).
#
# What it measures, all over loopback (127.0.0.1 only), client and larderd on the same machine:
#   (a) one BIG_GIB GiB object of random bytes downloaded to a file:
#         larder get -o FILE   (defaults: 8 connections, 8 MiB chunks, BLAKE3-verified, fsynced)
#         aria2c -x8 -s8 -k1M  (no verification)
#         curl -o FILE         (one connection, no verification)
#   (b) the same object to /dev/null: larder get -o - vs curl -o /dev/null (network + CPU only)
#   (c) a snapshot of a tree of TREE_FILES small files (save once with `larder save`), restored:
#         larder restore NS KEY DIR            (download ∥ zstd ∥ tar, verified, synced, staged
#                                               + renamed)
#         curl URL | zstd -d | tar -x -C DIR   (the shell pipeline a CI script would use; no
#                                               verification, no sync)
#       and, to compare like with like, `larder restore --no-sync` (leaves writeback to the
#       kernel, as the pipeline does) and the pipeline followed by `sync -f DIR` (durable when
#       done, as larder's default is). Flushing 100,000 new files costs about a second of
#       kernel CPU on this kind of machine, whoever asks for it.
#       Each restore goes into a fresh directory and the trees are deleted only at the end:
#       deleting 100,000 files makes this kind of disk slow for minutes (ext4 without a journal
#       skips recently freed inodes when allocating, one by one), which would penalise whichever
#       tool runs next.
#   (d) the client's peak RSS (VmHWM, from /usr/bin/time's %M) in each larder row; the issue's
#       bound is 2 × concurrency × chunk + 64 MiB = 192 MiB with the defaults.
# Every row runs REPS times, rotating the tools, and the best time of each is kept (the machine
# is shared and its disk is noisy). Outputs are deleted and `sync`ed between runs, untimed.
#
# Targets (issue 4): larder get >= 1.5x aria2c; larder restore >= 1.5x the curl|zstd|tar pipeline;
# RSS under the bound.
#
# How to run (as root, or with sudo for apt-get; takes ~10 minutes with the defaults):
#   bench/client-vs-aria2c.sh
# Knobs (environment): REPS=3 BIG_GIB=4 (2 if the disk has less than 24 GiB free) TREE_FILES=100000
#   ROWS="get restore" (either alone skips the other) LARDER_PORT=18090
#   KEEP=0 (1 keeps target/bench-client afterwards)
# It installs aria2, zstd, curl and time from Debian if missing, builds larderd and larder in
# release mode, wipes and uses target/bench-client, prints a Markdown table on stdout (progress on
# stderr) and also writes it with the raw per-run numbers to target/bench-client/results.md. The
# larderd it starts is stopped on exit.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
WORK=$REPO/target/bench-client
REPS=${REPS:-3}
PORT=${LARDER_PORT:-18090}
TREE_FILES=${TREE_FILES:-100000}
KEEP=${KEEP:-0}
ROWS=${ROWS:-get restore}
URL=http://127.0.0.1:$PORT
NS=bench

# Only what this script sets may reach larderd and larder.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^LARDER_' || true)

has_row() { [[ " $ROWS " == *" $1 "* ]]; }
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '\nclient-vs-aria2c: FAILED: %s\n' "$*" >&2; exit 1; }
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO=sudo

# --- 1. Tools --------------------------------------------------------------------------------
missing=()
command -v aria2c >/dev/null 2>&1 || missing+=(aria2)
command -v zstd >/dev/null 2>&1 || missing+=(zstd)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
[[ -x /usr/bin/time ]] || missing+=(time)
if ((${#missing[@]})); then
    log "installing from Debian: ${missing[*]}"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

log "building larderd and larder (release)"
(cd "$REPO" && cargo build --release --quiet -p larderd -p larder-client) >&2
LARDERD=$REPO/target/release/larderd
LARDER=$REPO/target/release/larder

# --- 2. Workspace and server -----------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK"
free_gib=$(($(df --output=avail -k "$WORK" | tail -1) / 1024 / 1024))
BIG_GIB=${BIG_GIB:-$(( free_gib >= 24 ? 4 : 2 ))}
# The big object three times (source, store, output) and four restored trees (~0.5 GiB each)
# per round, kept until the end.
need=$((BIG_GIB * 3 + 3))
has_row restore && need=$((need + REPS * 2))
((free_gib >= need)) || die "need about $need GiB free in $WORK, have $free_gib GiB"

SERVER_PID=""
cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $KEEP != 1 ]]; then
        rm -rf "$WORK/data" "$WORK/big" "$WORK/out" "$WORK/tree" "$WORK"/restore*
    fi
}
trap cleanup EXIT

log "starting larderd on $URL"
LARDER_LOG=warn "$LARDERD" --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" \
    --max-object-size 64GiB >"$WORK/larderd.out" 2>"$WORK/larderd.err" &
SERVER_PID=$!
for _ in $(seq 100); do
    grep -q 'larderd listening' "$WORK/larderd.out" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "larderd exited: $(cat "$WORK/larderd.err")"
    sleep 0.1
done
grep -q 'larderd listening' "$WORK/larderd.out" || die "larderd did not start"

# --- 3. Data ---------------------------------------------------------------------------------
BIG_URL=$URL/api/v1/object/$NS/big
BIG_BYTES=$((BIG_GIB << 30))
BIG_ETAG=""
if has_row get; then
    log "writing a $BIG_GIB GiB object of random bytes and uploading it"
    head -c "$BIG_BYTES" /dev/urandom >"$WORK/big"
    BIG_ETAG=$("$LARDER" --quiet --url "$URL" put "$NS" big "$WORK/big")
    curl -sf -o /dev/null "$BIG_URL"
fi

log "creating a tree of $TREE_FILES files and saving it as a snapshot"
python3 - "$WORK/tree" "$TREE_FILES" <<'EOF'
import os, random, sys
root, count = sys.argv[1], int(sys.argv[2])
rng = random.Random(4)
per_dir = 1000
text = b"fn build() { /* generated */ }\n" * 400
for i in range(count):
    d = os.path.join(root, f"pkg{i // per_dir:04d}", f"sub{(i // 100) % 10}")
    if i % 100 == 0:
        os.makedirs(d, exist_ok=True)
    size = rng.randrange(0, 8192)
    # Half compressible source-like text, half random (object files, images).
    body = text[:size] if i % 2 else rng.randbytes(size)
    with open(os.path.join(d, f"f{i}.dat"), "wb") as f:
        f.write(body)
EOF
TREE_BYTES=$(du -sb "$WORK/tree" | cut -f1)
"$LARDER" --quiet --url "$URL" save "$NS" tree "$WORK/tree" >/dev/null
TREE_URL=$URL/api/v1/object/$NS/tree
ARCHIVE_BYTES=$("$LARDER" --url "$URL" stat --json "$NS" tree | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')

# Warm the server's page cache.
curl -sf -o /dev/null "$TREE_URL"

# --- 4. Runs ---------------------------------------------------------------------------------
RAW=$WORK/raw.txt
: >"$RAW"
settle() {
    rm -rf "$WORK/out"
    sync
    sleep 1
}
# run NAME COMMAND…: times one run with /usr/bin/time; appends "NAME seconds maxrss_kib".
run() {
    local name=$1
    shift
    settle
    /usr/bin/time -f '%e %M' -o "$WORK/time.txt" "$@" || die "$name failed"
    read -r secs rss <"$WORK/time.txt"
    echo "$name $secs $rss" >>"$RAW"
    log "  $name: ${secs}s, peak RSS ${rss} KiB"
}
count_files() {
    local n
    n=$(find "$1" -type f | wc -l)
    ((n == TREE_FILES)) || die "$2 produced $n files instead of $TREE_FILES"
}

NULL_RSS=""
for rep in $(seq "$REPS"); do
    log "round $rep of $REPS"
    # Rotate the order so that no tool always runs on a freshly settled disk.
    order=(larder aria2c curl)
    for ((k = 0; k < rep - 1; k++)); do order=("${order[@]:1}" "${order[0]}"); done
    if has_row get; then
        for tool in "${order[@]}"; do
            case $tool in
            larder) run larder-file "$LARDER" --quiet --url "$URL" get "$NS" big -o "$WORK/out" ;;
            aria2c) run aria2c-file aria2c -q -x8 -s8 -k1M --file-allocation=none \
                --allow-overwrite=true -d "$WORK" -o out "$BIG_URL" ;;
            curl) run curl-file curl -sf -o "$WORK/out" "$BIG_URL" ;;
            esac
            if ((rep == 1)); then
                cmp -s "$WORK/out" "$WORK/big" || die "$tool wrote different bytes"
            fi
        done
        run larder-null bash -c "'$LARDER' --quiet --url '$URL' get '$NS' big -o - >/dev/null"
        run curl-null curl -sf -o /dev/null "$BIG_URL"
    fi
    if has_row restore; then
        tools=(larder pipeline larder-nosync pipeline-sync)
        for ((k = 0; k < rep - 1; k++)); do tools=("${tools[@]:1}" "${tools[0]}"); done
        for tool in "${tools[@]}"; do
            dir=$WORK/restore-$tool-$rep
            case $tool in
            larder) run larder-restore "$LARDER" --quiet --url "$URL" restore "$NS" tree "$dir" ;;
            larder-nosync) run larder-restore-nosync "$LARDER" --quiet --url "$URL" restore \
                --no-sync "$NS" tree "$dir" ;;
            pipeline)
                mkdir -p "$dir"
                run pipeline-restore bash -c "curl -sf '$TREE_URL' | zstd -dq | tar -x -C '$dir'"
                ;;
            pipeline-sync)
                mkdir -p "$dir"
                run pipeline-sync-restore bash -c \
                    "curl -sf '$TREE_URL' | zstd -dq | tar -x -C '$dir' && sync -f '$dir'"
                ;;
            esac
            ((rep == 1)) && count_files "$dir" "$tool"
        done
    fi
done
if has_row get; then
    # larder-null's RSS is that of bash; measure the client itself once.
    settle
    /usr/bin/time -f '%M' -o "$WORK/rss.txt" "$LARDER" --quiet --url "$URL" get "$NS" big -o - >/dev/null
    NULL_RSS=$(cat "$WORK/rss.txt")
fi

# --- 5. Report -------------------------------------------------------------------------------
best() { awk -v n="$1" '$1 == n { if (!b || $2 < b) b = $2 } END { print b }' "$RAW"; }
maxrss() { awk -v n="$1" '$1 == n { if ($3 > m) m = $3 } END { print m }' "$RAW"; }
gbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.2f", b / s / 1e9 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }

lf=$(best larder-file) af=$(best aria2c-file) cf=$(best curl-file)
ln=$(best larder-null) cn=$(best curl-null)
lr=$(best larder-restore) pr=$(best pipeline-restore)
lrn=$(best larder-restore-nosync) prs=$(best pipeline-sync-restore)
{
    echo "### larder client vs aria2c / curl ($(date -u +%Y-%m-%d), $(nproc) cores, loopback, best of $REPS)"
    echo
    has_row get && echo "Object: $BIG_GIB GiB of random bytes (ETag ${BIG_ETAG:0:12}…)."
    has_row restore && echo "Tree: $TREE_FILES files, $((TREE_BYTES >> 20)) MiB, archive $((ARCHIVE_BYTES >> 20)) MiB."
    echo
    echo "| row | larder | other | larder speed-up | larder peak RSS |"
    echo "|---|---|---|---|---|"
    if has_row get; then
        echo "| get to file vs aria2c -x8 -s8 -k1M | ${lf} s ($(gbps "$BIG_BYTES" "$lf") GB/s) | ${af} s ($(gbps "$BIG_BYTES" "$af") GB/s) | $(ratio "$lf" "$af")x | $(mib "$(maxrss larder-file)") MiB |"
        echo "| get to file vs curl | ${lf} s | ${cf} s ($(gbps "$BIG_BYTES" "$cf") GB/s) | $(ratio "$lf" "$cf")x | |"
        echo "| get to /dev/null vs curl | ${ln} s ($(gbps "$BIG_BYTES" "$ln") GB/s) | ${cn} s ($(gbps "$BIG_BYTES" "$cn") GB/s) | $(ratio "$ln" "$cn")x | $(mib "$NULL_RSS") MiB |"
    fi
    if has_row restore; then
        echo "| restore $TREE_FILES files vs curl \| zstd -d \| tar -x | ${lr} s | ${pr} s | $(ratio "$lr" "$pr")x | $(mib "$(maxrss larder-restore)") MiB |"
        echo "| restore --no-sync vs curl \| zstd -d \| tar -x (both leave writeback to the kernel) | ${lrn} s | ${pr} s | $(ratio "$lrn" "$pr")x | $(mib "$(maxrss larder-restore-nosync)") MiB |"
        echo "| restore vs curl \| zstd -d \| tar -x && sync -f (both durable when done) | ${lr} s | ${prs} s | $(ratio "$lr" "$prs")x | |"
    fi
    echo
    echo "RSS bound with the defaults: 2 x 8 x 8 MiB + 64 MiB = 192 MiB."
} | tee "$WORK/results.md"
{
    echo
    echo "Raw runs (name, seconds, max RSS KiB):"
    echo '```'
    cat "$RAW"
    echo '```'
} >>"$WORK/results.md"
log "results in $WORK/results.md"
