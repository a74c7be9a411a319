#!/usr/bin/env bash
# bench/git-restore.sh — `larder git restore` against `git clone` (issue 11).
#
# What it measures, all over loopback (127.0.0.1 only), upstream, larderd and client on the same
# machine, each time until `git status` is clean (a checkout a CI job can build from):
#   clone      git clone UPSTREAM DIR                  (full history, smart HTTP)
#   depth1     git clone --depth 1 UPSTREAM DIR        (one commit, no history)
#   tar        zstd -dc SNAPSHOT | tar -x -C DIR       (the snapshot file already on local disk:
#                                                       the floor for any snapshot restore)
#   larder     larder git restore UPSTREAM DIR --no-sync (head record, parallel verified download
#                                                       from larderd's disk tier, extraction,
#                                                       .git sanitised, index rebuilt and checked)
#   larder-sync the same without --no-sync (flushed to disk before it appears, larder's default)
# and the upstream's response bytes for `git clone --bundle-uri=<larderd's bundles.list>` vs a
# plain `git clone`, with each git on the machine (/usr/bin/git and the one first on PATH).
#
# Repositories (REPOS): `ripgrep` (the fixture ../shared/fixtures/git/ripgrep.bundle) and
# `generated` (bench/make-git-repo.py: 23,000 commits, 3,072 files, ~120 MiB pack, like the
# issue's anchor). The upstream is git's own http-backend behind the tests' HTTP server
# (crates/larder-testkit/src/bin/git-http-server.rs), which counts the bytes it serves.
#
# Every row runs REPS times, rotating the order, and the median is kept. Every result goes into
# a fresh directory and all are deleted only at the end (file creation on this kind of disk slows
# down for minutes after large deletions, which would penalise whichever row runs next). The
# generator and the server share the machine's cores with the tool being measured.
#
# Targets (issue 11, generated repository): larder >= 8x clone, >= 1.5x depth1, and within 1.3x
# of tar.
#
# How to run (as root, or with sudo for apt-get; ~10 minutes, most of it making the generated
# repository the first time, which is kept in target/bench-git/upstream for later runs):
#   bench/git-restore.sh
# Knobs (environment): REPS=5 REPOS="ripgrep generated" LARDER_PORT=18095 KEEP=0
# Prints a Markdown table on stdout (progress on stderr) and writes it with the raw per-run
# numbers to target/bench-git/results.md. Everything it starts is stopped on exit.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
WORK=$REPO/target/bench-git
REPS=${REPS:-5}
PORT=${LARDER_PORT:-18095}
REPOS=${REPOS:-ripgrep generated}
KEEP=${KEEP:-0}
URL=http://127.0.0.1:$PORT
FIXTURE=$REPO/../shared/fixtures/git/ripgrep.bundle
NEW_GIT=$(command -v git)
OLD_GIT=/usr/bin/git

# Only what this script sets may reach larderd and larder.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^LARDER_' || true)

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '\ngit-restore: FAILED: %s\n' "$*" >&2; exit 1; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

need=()
command -v zstd >/dev/null || need+=(zstd)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

log "building larderd, larder and git-http-server (release)"
(cd "$REPO" && cargo build --release -q -p larderd -p larder-client -p larder-testkit --bin larderd --bin larder --bin git-http-server)
BIN=$REPO/target/release

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "$KEEP" != 1 ]; then rm -rf "$WORK/runs" "$WORK/data" "$WORK/mirrors"; fi
}
trap cleanup EXIT

mkdir -p "$WORK/upstream"
rm -rf "$WORK/runs" "$WORK/data" "$WORK/mirrors"
mkdir -p "$WORK/runs"

for name in $REPOS; do
    dest=$WORK/upstream/$name.git
    [ -d "$dest" ] && continue
    case $name in
    ripgrep)
        [ -f "$FIXTURE" ] || die "no fixture at $FIXTURE"
        git -c init.defaultBranch=main clone -q --bare "$FIXTURE" "$dest"
        ;;
    generated)
        log "making the generated repository (once; kept for later runs)"
        python3 "$SCRIPT_DIR/make-git-repo.py" "$dest.tmp" && mv "$dest.tmp" "$dest"
        ;;
    *) die "unknown repository $name" ;;
    esac
done

STATS=$WORK/upstream-bytes
coproc UPSTREAM { exec "$BIN/git-http-server" "$WORK/upstream" "$STATS"; }
PIDS+=("$UPSTREAM_PID")
read -r UPSTREAM_ADDR <&"${UPSTREAM[0]}"
log "upstream at http://$UPSTREAM_ADDR"
served() { cat "$STATS"; }

"$BIN/larderd" --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" \
    --git-allow "http://127.0.0.1:*/*" --git-interval 1h --git-mirror-dir "$WORK/mirrors" \
    --log-format json >"$WORK/larderd.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 100); do curl -fs "$URL/_readiness" >/dev/null 2>&1 && break; sleep 0.1; done

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
clean_status() {
    local s
    s=$(git -C "$1" status --porcelain) || die "git status failed in $1"
    [ -z "$s" ] || die "$1 is not clean after $2: $s"
}
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }

RAW=$WORK/raw.tsv
: >"$RAW"
BYTES=$WORK/bytes.tsv
: >"$BYTES"
n=0
for name in $REPOS; do
    upstream=http://$UPSTREAM_ADDR/$name.git
    head=$URL/api/v1/git/$UPSTREAM_ADDR/$name.git/head
    log "$name: waiting for larderd's snapshot"
    record=""
    for _ in $(seq 600); do
        record=$(curl -fs "$head" 2>/dev/null) && break
        sleep 0.5
    done
    [ -n "$record" ] || die "no snapshot of $name within 5 minutes (see $WORK/larderd.log)"
    key=$(json_field snapshot_key <<<"$record")
    snapshot=$WORK/runs/$name.tar.zst
    "$BIN/larder" --url "$URL" -q get git "$key" -o "$snapshot"
    log "$name: snapshot $(du -h "$snapshot" | cut -f1), commit $(json_field commit <<<"$record")"

    for rep in $(seq "$REPS"); do
        rows=(clone depth1 tar larder larder-sync)
        # Rotate, so that no row always runs right after the same other one.
        shift_by=$((rep % ${#rows[@]}))
        rows=("${rows[@]:shift_by}" "${rows[@]:0:shift_by}")
        for row in "${rows[@]}"; do
            n=$((n + 1))
            dir=$WORK/runs/$name-$row-$rep
            sync
            before=$(served)
            t0=$(now)
            case $row in
            clone) git clone -q "$upstream" "$dir" && git -C "$dir" status --porcelain >/dev/null ;;
            depth1) git clone -q --depth 1 "$upstream" "$dir" && git -C "$dir" status --porcelain >/dev/null ;;
            tar) mkdir "$dir" && zstd -qdc "$snapshot" | tar -x -C "$dir" && git -C "$dir" status --porcelain >/dev/null ;;
            larder) "$BIN/larder" --url "$URL" -q git restore "$upstream" "$dir" --no-sync && git -C "$dir" status --porcelain >/dev/null ;;
            larder-sync) "$BIN/larder" --url "$URL" -q git restore "$upstream" "$dir" && git -C "$dir" status --porcelain >/dev/null ;;
            esac
            t1=$(now)
            clean_status "$dir" "$row"
            printf '%s\t%s\t%s\t%s\n' "$name" "$row" "$(elapsed "$t0" "$t1")" "$(($(served) - before))" >>"$RAW"
            log "$name $row #$rep: $(tail -1 "$RAW" | cut -f3) s"
        done
    done

    list=$URL/api/v1/git/$UPSTREAM_ADDR/$name.git/bundles.list
    if curl -fs -o /dev/null "$list"; then
        for gitbin in "$OLD_GIT" "$NEW_GIT"; do
            version=$("$gitbin" --version | awk '{print $3}')
            dir=$WORK/runs/$name-bundle-$version
            before=$(served)
            "$gitbin" clone -q --bundle-uri="$list" "$upstream" "$dir"
            with=$(($(served) - before))
            dir=$WORK/runs/$name-plain-$version
            before=$(served)
            "$gitbin" clone -q "$upstream" "$dir"
            plain=$(($(served) - before))
            [ "$(git -C "$dir" rev-parse HEAD)" = "$(git -C "$WORK/runs/$name-bundle-$version" rev-parse HEAD)" ] \
                || die "bundle-uri clone of $name with git $version is at another commit"
            printf '%s\t%s\t%s\t%s\n' "$name" "$version" "$with" "$plain" >>"$BYTES"
            log "$name git $version: upstream bytes $with with --bundle-uri, $plain without"
        done
    else
        log "$name: no bundles.list from larderd; bundle-uri row skipped"
    fi
done

python3 - "$RAW" "$BYTES" "$REPS" "$(nproc)" <<'EOF' | tee "$WORK/results.md"
import collections, datetime, statistics, sys
raw, bytes_file, reps, cores = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
times = collections.defaultdict(list)
for line in open(raw):
    name, row, secs, _ = line.rstrip("\n").split("\t")
    times[(name, row)].append(float(secs))
names = list(dict.fromkeys(n for n, _ in times))
today = datetime.date.today().isoformat()
print(f"### git restore vs git clone ({today}, {cores} cores, loopback, median of {reps})\n")
print("Until `git status` is clean. Ratios: the row's time divided by larder's (`--no-sync`).\n")
print("| repository | git clone | clone --depth 1 | zstd -d \\| tar -x | larder git restore | larder (synced) | clone / larder | depth 1 / larder | larder / tar |")
print("|---|---|---|---|---|---|---|---|---|")
for n in names:
    m = {row: statistics.median(times[(n, row)]) for (nn, row) in times if nn == n}
    print(f"| {n} | {m['clone']:.2f} s | {m['depth1']:.2f} s | {m['tar']:.2f} s | {m['larder']:.2f} s "
          f"| {m['larder-sync']:.2f} s | {m['clone'] / m['larder']:.1f}x | {m['depth1'] / m['larder']:.1f}x "
          f"| {m['larder'] / m['tar']:.2f}x |")
rows = [l.rstrip("\n").split("\t") for l in open(bytes_file)]
if rows:
    print("\n| repository | git | upstream bytes, clone --bundle-uri | upstream bytes, plain clone | share |")
    print("|---|---|---|---|---|")
    for n, version, with_, plain in rows:
        print(f"| {n} | {version} | {int(with_):,} | {int(plain):,} | {100 * int(with_) / int(plain):.1f} % |")
print("\nRaw runs (repository, row, seconds, upstream bytes):\n")
for line in open(raw):
    print("    " + line.rstrip("\n"))
EOF
