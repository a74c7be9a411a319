#!/usr/bin/env bash
# s3-server.sh: start a REAL S3-compatible server on 127.0.0.1 for larder's tests and CI (no Docker).
#
# larder's S3 tier must be tested against a real server (no mocks): this script installs (from Debian,
# when missing) and starts Ceph's RADOS Gateway on a throw-away single-node Ceph cluster, so anyone who
# clones the repo, and CI on a fresh machine, gets the same server with one command.
#
# Default implementation (S3_IMPL=radosgw): Ceph RADOS Gateway from Debian 12 (Ceph 16.2 "pacific")
# on a throw-away single-node Ceph cluster: 1 ceph-mon + 1 ceph-osd (BlueStore on a sparse file in
# the data dir, or MemStore) + radosgw (beast frontend). cephx is off, so bind to loopback only.
# Alternative (S3_IMPL=garage): Garage 2.5.0 from crates.io in --single-node mode (about 10 min to build;
# GET conditionals work, but it IGNORES If-None-Match/If-Match on PUT, which larder detects and refuses).
#
# Usage (from the repository root):
#   set -a; eval "$(scripts/s3-server.sh --port 9000 --data-dir "$PWD/target/s3")"; set +a  # start
#   (or: eval "$(scripts/s3-server.sh --export ...)" to get 'export KEY=VALUE' lines; or: set -a; . DATA_DIR/s3.env)
#   cargo test -p larder-tier --test s3     # uses $AWS_ENDPOINT_URL, $AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY,
#                                           # $AWS_REGION, $S3_BUCKET
#   scripts/s3-server.sh stop "$PWD/target/s3"                  # stops everything, waits (or: kill "$S3_PID")
#
# Options (a flag wins over its env var):
#   --port N      | S3_PORT      S3 port on 127.0.0.1 (default 9000). Also takes N+1 (ceph-mon or garage rpc)
#                                and N+2 (garage admin API).
#   --data-dir D  | S3_DATA_DIR  where everything lives (default: a new mktemp dir). Must not exist, be empty,
#                                or be a dir made earlier by this script (it is then WIPED: data is throw-away).
#   --bucket B    | S3_BUCKET    bucket created at start (default test-bucket)
#   --impl I      | S3_IMPL      radosgw (default) | garage
#   S3_ACCESS_KEY / S3_SECRET_KEY  credentials created at start (fixed test defaults below)
#   S3_REGION                    default us-east-1 (radosgw accepts any region; garage is configured with it)
#   S3_OSD_STORE                 radosgw: bluestore (default; sparse file, RAM bounded) | memstore (all in RAM)
#   S3_STORE_SIZE                radosgw: BlueStore file size / MemStore bytes, in bytes (default 10 GiB)
#   S3_READY_TIMEOUT             seconds to wait for readiness (default 120)
#   S3_SKIP_INSTALL=1            never install; fail if binaries are missing
# Output: KEY=VALUE lines on stdout (also saved to $DATA_DIR/s3.env); progress and errors on stderr;
#         server logs in $DATA_DIR/log/.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
MARKER=".s3-server-data-dir"
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
GARAGE_VERSION=2.5.0

log() { echo "s3-server: $*" >&2; }
die() { echo "s3-server: ERROR: $*" >&2; exit 1; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
http_code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true; }
new_uuid() { cat /proc/sys/kernel/random/uuid; }
rand_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# ---------------------------------------------------------------------------------------------
# radosgw supervisor: runs in its own session, owns mon/osd/rgw; SIGTERM/SIGINT stops them all.
# ---------------------------------------------------------------------------------------------
supervise_radosgw() {
  local D=$1 PORT=$2
  local C=(-c "$D/ceph.conf")
  local mon="" osd="" rgw=""
  stop_all() {
    trap - TERM INT HUP
    echo "supervisor: stopping (rgw=$rgw osd=$osd mon=$mon)"
    for p in $rgw $osd $mon; do
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    echo "supervisor: stopped"
    exit "${1:-0}"
  }
  trap 'stop_all 0' TERM INT HUP

  local fsid osd_uuid
  fsid=$(grep '^fsid' "$D/ceph.conf" | awk '{print $3}')
  monmaptool --create --add a "v1:127.0.0.1:$((PORT + 1))" --fsid "$fsid" "$D/monmap"
  ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
  ceph-mon "${C[@]}" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring"
  ceph-mon "${C[@]}" -i a -f & mon=$!
  timeout 60 ceph "${C[@]}" --connect-timeout 50 -s >/dev/null || { echo "supervisor: mon not up"; stop_all 1; }
  osd_uuid=$(new_uuid)
  timeout 60 ceph "${C[@]}" osd new "$osd_uuid" 0 || stop_all 1
  ceph-osd "${C[@]}" -i 0 --mkfs --osd-uuid "$osd_uuid" || stop_all 1
  # crush placement done by hand: with auth=none, the OSD's own crush update fails ('wrong fsid')
  timeout 60 ceph "${C[@]}" osd crush add-bucket localhost host || stop_all 1
  timeout 60 ceph "${C[@]}" osd crush move localhost root=default || stop_all 1
  timeout 60 ceph "${C[@]}" osd crush add osd.0 1.0 host=localhost || stop_all 1
  ceph-osd "${C[@]}" -i 0 -f & osd=$!
  radosgw "${C[@]}" -n client.rgw.a -f & rgw=$!
  echo "supervisor: started mon=$mon osd=$osd rgw=$rgw"
  # if any daemon dies, take the rest down too
  while true; do
    wait -n || true
    for p in $mon $osd $rgw; do
      if ! kill -0 "$p" 2>/dev/null; then echo "supervisor: daemon $p exited"; stop_all 1; fi
    done
  done
}

install_radosgw() {
  command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && return 0
  [ "${S3_SKIP_INSTALL:-0}" = 1 ] && die "radosgw/ceph-mon/ceph-osd missing and S3_SKIP_INSTALL=1"
  log "installing radosgw ceph-mon ceph-osd from Debian (about 1 min)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends radosgw ceph-mon ceph-osd ceph-common curl >&2
}

write_ceph_conf() {
  local D=$1 PORT=$2 store=$3 size=$4
  cat > "$D/ceph.conf" <<EOF
[global]
fsid = $(new_uuid)
mon host = v1:127.0.0.1:$((PORT + 1))
mon initial members = a
public addr = 127.0.0.1
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
paxos propose interval = 0.1
mon data avail warn = 1
mon data avail crit = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
osd crush update on start = false
osd class update on start = false
osd max object name len = 460
osd max object namespace len = 64
osd objectstore = $store
memstore device bytes = $size
bluestore block create = true
bluestore block size = $size
bluestore block db create = false
bluestore block wal create = false
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096

[mon.a]
mon data = $D/mon.a

[osd.0]
osd data = $D/osd.0
bluestore block path = $D/osd.0.block

[client.rgw.a]
# tcp_nodelay: beast writes a response's head and its body apart, and with Nagle on, a small body
# (a reference object) can wait for the client's delayed ACK: a 42 ms gap seen in strace of larderd.
rgw frontends = beast endpoint=127.0.0.1:$PORT tcp_nodelay=1
rgw data = $D/rgw
rgw dns name = localhost
rgw dynamic resharding = false
rgw gc obj min wait = 60
rgw gc processor period = 60
EOF
}

# curl with SigV4 (curl >= 7.75); empty-payload requests only
s3_curl() { curl -sS -m 30 --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
            -H "x-amz-content-sha256: $EMPTY_SHA256" "$@"; }

wait_http() {
  local url=$1 pid=$2 deadline=$((SECONDS + READY_TIMEOUT)) c
  while :; do
    c=$(http_code "$url")
    [ -n "$c" ] && [ "$c" != 000 ] && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    [ $SECONDS -ge $deadline ] && return 1
    sleep 0.2
  done
}

start_radosgw() {
  install_radosgw
  local store=${S3_OSD_STORE:-bluestore} size=${S3_STORE_SIZE:-10737418240}
  mkdir -p "$D"/{mon.a,osd.0,run,log,rgw}
  write_ceph_conf "$D" "$PORT" "$store" "$size"
  setsid bash "$SELF" __supervise_radosgw "$D" "$PORT" >"$D/log/supervisor.log" 2>&1 </dev/null &
  S3_PID=$!
  echo "$S3_PID" > "$D/run/s3.pid"
  if ! wait_http "http://127.0.0.1:$PORT/" "$S3_PID"; then
    tail -n 30 "$D/log/supervisor.log" >&2 || true
    kill "$S3_PID" 2>/dev/null || true
    die "radosgw did not become ready (logs in $D/log)"
  fi
  timeout 60 radosgw-admin -c "$D/ceph.conf" user create --uid=s3test --display-name=s3test \
    --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null 2>>"$D/log/radosgw-admin.err" \
    || { kill "$S3_PID"; die "radosgw-admin user create failed (see $D/log/radosgw-admin.err)"; }
}

install_garage() {
  GARAGE_BIN=${GARAGE_BIN:-$(command -v garage || true)}
  [ -z "$GARAGE_BIN" ] && [ -x "${HOME:-/root}/.cargo/bin/garage" ] && GARAGE_BIN="${HOME:-/root}/.cargo/bin/garage"
  if [ -z "$GARAGE_BIN" ] || ! "$GARAGE_BIN" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
    [ "${S3_SKIP_INSTALL:-0}" = 1 ] && die "garage $GARAGE_VERSION missing and S3_SKIP_INSTALL=1"
    log "building garage $GARAGE_VERSION with cargo install (about 10 min on 2 cores)"
    cargo install garage --version "$GARAGE_VERSION" --locked >&2
    GARAGE_BIN="${HOME:-/root}/.cargo/bin/garage"
  fi
}

start_garage() {
  install_garage
  mkdir -p "$D"/{meta,data,run,log}
  cat > "$D/garage.toml" <<EOF
metadata_dir = "$D/meta"
data_dir = "$D/data"
db_engine = "sqlite"
replication_factor = 1
metadata_fsync = false
data_fsync = false
rpc_bind_addr = "127.0.0.1:$((PORT + 1))"
rpc_public_addr = "127.0.0.1:$((PORT + 1))"
rpc_secret = "$(rand_hex 32)"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((PORT + 2))"
admin_token = "$(rand_hex 32)"
EOF
  chmod 600 "$D/garage.toml"
  # --single-node sets up the layout; --default-bucket creates key + bucket (RWO) from these env vars
  GARAGE_DEFAULT_ACCESS_KEY="$ACCESS_KEY" GARAGE_DEFAULT_SECRET_KEY="$SECRET_KEY" GARAGE_DEFAULT_BUCKET="$BUCKET" \
    setsid "$GARAGE_BIN" -c "$D/garage.toml" server --single-node --default-bucket \
    >"$D/log/garage.log" 2>&1 </dev/null &
  S3_PID=$!
  echo "$S3_PID" > "$D/run/s3.pid"
  if ! wait_http "http://127.0.0.1:$((PORT + 2))/health" "$S3_PID" || ! wait_http "http://127.0.0.1:$PORT/" "$S3_PID"; then
    tail -n 30 "$D/log/garage.log" >&2 || true
    kill "$S3_PID" 2>/dev/null || true
    die "garage did not become ready (logs in $D/log)"
  fi
}

stop_dir() {
  local D=$1 pid
  [ -f "$D/run/s3.pid" ] || die "no $D/run/s3.pid"
  pid=$(cat "$D/run/s3.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid still alive after 30 s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for f in "$D"/run/client.rgw.a.pid "$D"/run/osd.0.pid "$D"/run/mon.a.pid; do
        [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
      done
    fi
  fi
  log "stopped (pid $pid)"
}

# ---------------------------------------------------------------------------------------------
case "${1:-}" in
  __supervise_radosgw) shift; supervise_radosgw "$@"; exit $? ;;
  stop) [ -n "${2:-}" ] || die "usage: $0 stop DATA_DIR"; stop_dir "$2"; exit 0 ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"; exit 0 ;;
esac

PORT=${S3_PORT:-9000}
D=${S3_DATA_DIR:-}
BUCKET=${S3_BUCKET:-test-bucket}
IMPL=${S3_IMPL:-radosgw}
EXPORT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --data-dir) D=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;
    --impl) IMPL=$2; shift 2 ;;
    --export) EXPORT=1; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
ACCESS_KEY=${S3_ACCESS_KEY:-AKIACITEST0000000001}
SECRET_KEY=${S3_SECRET_KEY:-ci-secret-key-0123456789abcdef0123456789}
REGION=${S3_REGION:-us-east-1}
READY_TIMEOUT=${S3_READY_TIMEOUT:-120}

[ -n "$D" ] || D=$(mktemp -d /tmp/s3-server.XXXXXX)
mkdir -p "$D"
D=$(cd "$D" && pwd)
case "$D" in /|/root|/home|/tmp|/usr|/var|/etc) die "refusing data dir $D" ;; esac
if [ -n "$(ls -A "$D")" ]; then
  [ -f "$D/$MARKER" ] || die "data dir $D is not empty and was not made by s3-server.sh"
  if [ -f "$D/run/s3.pid" ] && kill -0 "$(cat "$D/run/s3.pid")" 2>/dev/null; then
    die "an instance is still running from $D (pid $(cat "$D/run/s3.pid")); stop it first"
  fi
  find "$D" -mindepth 1 -delete
fi
touch "$D/$MARKER"
ports="$PORT $((PORT + 1))"; [ "$IMPL" = garage ] && ports="$ports $((PORT + 2))"
for p in $ports; do if port_busy "$p"; then die "port $p on 127.0.0.1 is in use"; fi; done

T0=$SECONDS
case "$IMPL" in
  radosgw) start_radosgw ;;
  garage) start_garage ;;
  *) die "unknown impl $IMPL" ;;
esac

# create the bucket (garage already made it) and check that the credentials work
if [ "$IMPL" = radosgw ]; then
  code=$(s3_curl -o "$D/log/create-bucket.out" -w '%{http_code}' -X PUT "http://127.0.0.1:$PORT/$BUCKET") || true
  [ "$code" = 200 ] || { kill "$S3_PID"; die "create bucket $BUCKET: HTTP $code $(cat "$D/log/create-bucket.out")"; }
fi
code=$(s3_curl -o /dev/null -w '%{http_code}' -I "http://127.0.0.1:$PORT/$BUCKET") || true
[ "$code" = 200 ] || { kill "$S3_PID"; die "HEAD bucket $BUCKET gave HTTP $code"; }
log "$IMPL ready on 127.0.0.1:$PORT in $((SECONDS - T0)) s (data dir $D, stop with: kill $S3_PID)"

# radosgw 16.2 rejects the aws-chunked "STREAMING-UNSIGNED-PAYLOAD-TRAILER" uploads that newer AWS SDKs send by
# default (XAmzContentSHA256Mismatch); these standard env vars make SDKs send checksums only when required.
CHECKSUM_ENV=""
if [ "$IMPL" = radosgw ]; then
  CHECKSUM_ENV="AWS_REQUEST_CHECKSUM_CALCULATION=when_required
AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
"
fi
cat > "$D/s3.env" <<EOF
AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
AWS_ACCESS_KEY_ID=$ACCESS_KEY
AWS_SECRET_ACCESS_KEY=$SECRET_KEY
AWS_REGION=$REGION
AWS_DEFAULT_REGION=$REGION
S3_BUCKET=$BUCKET
S3_FORCE_PATH_STYLE=true
${CHECKSUM_ENV}S3_IMPL=$IMPL
S3_DATA_DIR=$D
S3_PID=$S3_PID
EOF
if [ "$EXPORT" = 1 ]; then sed 's/^/export /' "$D/s3.env"; else cat "$D/s3.env"; fi
