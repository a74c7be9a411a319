#!/usr/bin/env bash
# bench/s3-small.sh — small objects through the S3 tier against the S3 server itself (issue 13,
# item 2 for the many small cache entries of a build tool, where a miss is all latency).
#
# Everything over loopback, on a throw-away Ceph RGW started by scripts/s3-server.sh. For each
# larderd build given (default: the tree's release build), REPS times, alternating:
#   PUT      COUNT objects of SIZE bytes, one after another over one connection (curl -K), through
#            a larderd with the S3 tier, and the same number directly to RGW (curl, SigV4).
#   cold GET each of them once through a second replica that has never seen them (a fresh data
#            dir on the same bucket and prefix: every GET is a miss), and the direct objects from
#            RGW with the same client.
# Printed per build: the medians of time per request, their ratio to the direct requests of the
# same rep (larderd / direct: 1.00 means "as fast as asking the S3 server"), and the S3 requests
# larderd made per client request (from /metrics, larder_s3_request_duration_seconds_count).
# Generator, larderd and RGW share the two cores.
#
#   bench/s3-small.sh                                   # the tree's build
#   bench/s3-small.sh /tmp/larderd-before /tmp/larderd-after
# Knobs: COUNT=200 SIZE=4096 REPS=3 S3_PORT=9450 LARDER_PORT=18460. Needs curl (and installs
# radosgw through scripts/s3-server.sh when missing).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$REPO/target/bench-s3-small
COUNT=${COUNT:-200}
SIZE=${SIZE:-4096}
REPS=${REPS:-3}
S3_PORT=${S3_PORT:-9450}
LPORT=${LARDER_PORT:-18460}
log() { echo "[$(date +%T)] $*" >&2; }

builds=("$@")
if ((${#builds[@]} == 0)); then
  (cd "$REPO" && cargo build --release -q -p larderd)
  builds=("$REPO/target/release/larderd")
fi
for b in "${builds[@]}"; do [[ -x $b ]] || { echo "not an executable: $b" >&2; exit 2; }; done

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -f "$WORK/s3/run/s3.pid" ] && "$REPO/scripts/s3-server.sh" stop "$WORK/s3" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK/objects"
set -a
eval "$("$REPO/scripts/s3-server.sh" --port "$S3_PORT" --data-dir "$WORK/s3" --bucket bench)"
set +a
sigv4=(--aws-sigv4 "aws:amz:$AWS_REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY")
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
for i in $(seq "$COUNT"); do head -c "$SIZE" /dev/urandom >"$WORK/objects/$i"; done

start_larderd() { # binary port data-dir prefix
  local bin=$1 port=$2 dir=$3 prefix=$4
  LARDER_LOG=warn "$bin" --listen "127.0.0.1:$port" --data-dir "$dir" \
    --s3-bucket bench --s3-prefix "$prefix" >"$dir.out" 2>"$dir.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q "listening" "$dir.out" 2>/dev/null && return 0; sleep 0.1; done
  echo "larderd on $port did not start" >&2; cat "$dir.err" >&2; exit 1
}
stop_larderd() {
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}
s3_requests() { # port
  curl -sf "http://127.0.0.1:$1/metrics" |
    awk '/^larder_s3_request_duration_seconds_count/ {n += $2} END {print n + 0}'
}
# Seconds one curl takes for the requests in config file $1 (one connection, in order).
timed() {
  local start end
  start=$(date +%s.%N)
  curl -sf -K "$1" >/dev/null
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}
put_config() { # base-url extra-curl-options...
  local base=$1; shift
  for i in $(seq "$COUNT"); do
    printf 'upload-file = "%s"\nurl = "%s/%s"\noutput = "/dev/null"\n' "$WORK/objects/$i" "$base" "$i"
  done
  for o in "$@"; do printf '%s\n' "$o"; done
}
get_config() { # base-url extra-curl-options...
  local base=$1; shift
  for i in $(seq "$COUNT"); do
    printf 'url = "%s/%s"\noutput = "/dev/null"\n' "$base" "$i"
  done
  for o in "$@"; do printf '%s\n' "$o"; done
}
command -v bc >/dev/null || { apt-get update -qq && apt-get install -y -qq bc >&2; }
signing=("aws-sigv4 = \"aws:amz:$AWS_REGION:s3\"" "user = \"$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY\"")

declare -A results
for rep in $(seq "$REPS"); do
  for n in "${!builds[@]}"; do
    bin=${builds[$n]}
    prefix="r$rep-b$n"
    rm -rf "$WORK/writer" "$WORK/reader"
    start_larderd "$bin" "$LPORT" "$WORK/writer" "$prefix"
    start_larderd "$bin" "$((LPORT + 1))" "$WORK/reader" "$prefix"
    put_config "http://127.0.0.1:$LPORT/api/v1/object/bench" >"$WORK/put.conf"
    get_config "http://127.0.0.1:$((LPORT + 1))/api/v1/object/bench" >"$WORK/get.conf"
    put_config "$AWS_ENDPOINT_URL/bench/direct-$prefix" "${signing[@]}" \
      'header = "x-amz-content-sha256: UNSIGNED-PAYLOAD"' >"$WORK/direct-put.conf"
    get_config "$AWS_ENDPOINT_URL/bench/direct-$prefix" "${signing[@]}" \
      "header = \"x-amz-content-sha256: $EMPTY_SHA256\"" >"$WORK/direct-get.conf"

    s3_before=$(s3_requests "$LPORT")
    put=$(timed "$WORK/put.conf")
    put_s3=$(($(s3_requests "$LPORT") - s3_before))
    direct_put=$(timed "$WORK/direct-put.conf")
    s3_before=$(s3_requests "$((LPORT + 1))")
    get=$(timed "$WORK/get.conf")
    get_s3=$(($(s3_requests "$((LPORT + 1))") - s3_before))
    direct_get=$(timed "$WORK/direct-get.conf")
    # Every object came back whole through the cold replica.
    curl -sf "http://127.0.0.1:$((LPORT + 1))/api/v1/object/bench/$COUNT" | cmp -s - "$WORK/objects/$COUNT" \
      || { echo "build $n served wrong bytes" >&2; exit 1; }
    stop_larderd
    results[$n,put]+="$(echo "$put * 1000 / $COUNT" | bc -l) "
    results[$n,put_ratio]+="$(echo "$put / $direct_put" | bc -l) "
    results[$n,get]+="$(echo "$get * 1000 / $COUNT" | bc -l) "
    results[$n,get_ratio]+="$(echo "$get / $direct_get" | bc -l) "
    results[$n,put_s3]+="$(echo "$put_s3 / $COUNT" | bc -l) "
    results[$n,get_s3]+="$(echo "$get_s3 / $COUNT" | bc -l) "
    log "rep $rep, build $n: PUT $(printf %.2f "$(echo "$put * 1000 / $COUNT" | bc -l)") ms" \
      "($(printf %.2f "$(echo "$put / $direct_put" | bc -l)")x direct, $put_s3 S3 requests)," \
      "cold GET $(printf %.2f "$(echo "$get * 1000 / $COUNT" | bc -l)") ms" \
      "($(printf %.2f "$(echo "$get / $direct_get" | bc -l)")x direct, $get_s3 S3 requests)"
  done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo "| build ($COUNT objects of $SIZE bytes, one connection, medians of $REPS; generator, larderd and RGW share the cores) | PUT ms | / direct | S3 requests per PUT | cold GET ms | / direct | S3 requests per cold GET |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for n in "${!builds[@]}"; do
  printf '| %s | %s | %s× | %s | %s | %s× | %s |\n' "${builds[$n]}" \
    "$(median <<<"${results[$n,put]}")" "$(median <<<"${results[$n,put_ratio]}")" \
    "$(median <<<"${results[$n,put_s3]}")" "$(median <<<"${results[$n,get]}")" \
    "$(median <<<"${results[$n,get_ratio]}")" "$(median <<<"${results[$n,get_s3]}")"
done
