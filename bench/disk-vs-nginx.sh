#!/usr/bin/env bash
# bench/disk-vs-nginx.sh — larderd's disk tier against nginx serving the same bytes (issue 2).
#
# What it measures, all over loopback (127.0.0.1 only), client and servers on the same machine:
#   (a) one 1 GiB object, full GETs, 1 connection        wrk -t1 -c1   -> bytes/s
#   (b) the same, 4 connections                          wrk -t2 -c4   -> bytes/s
#   (c) 64 MiB Range GETs at random 64 MiB-aligned
#       offsets of that 1 GiB object, 4 connections      wrk -t2 -c4   -> bytes/s
#   (d) 200 objects of 4 KiB in rotation, 64 connections wrk -t2 -c64  -> requests/s
#   (e) peak server RSS while 16 curls each download the 1 GiB object at once (VmRSS sampled
#       every 0.2 s; nginx: sum over its workers)
#   (f) larderd start-up time with 100,000 objects on disk: exec to the "larderd listening on"
#       line (serving), and to the background index load being complete, with a warm page cache
#       and (if /proc/sys/vm/drop_caches is writable) a cold one.
# nginx runs twice, as two instances with identical files and URL paths: one with
# "sendfile on; tcp_nopush on;" (port NGINX_PORT) and one with "sendfile off; output_buffers 2 1m;"
# (port NGINX_PORT+1); the better of the two per row is "nginx best". Every row is run REPS times,
# rotating larderd / nginx-sendfile / nginx-nosendfile, and the best of each server is kept,
# which tames the noise of a shared machine. All files are read once before measuring (page
# cache) and larderd serves each object once before measuring.
#
# Targets (issue 2): larderd >= 1.2x nginx best on the large rows, >= 1.0x on the 4 KiB row,
# peak RSS < 100 MiB, start-up < 2 s.
#
# Other processes on the machine skew every row (all rows are CPU-bound on a small machine), so
# before each run the script waits up to QUIET_MAX seconds for a second in which the machine is
# under QUIET_BUSY % busy, and it reports the CPU other processes took during each run.
#
# How to run (as root, or with sudo for apt-get and drop_caches; ~8 minutes on an idle machine,
# longer when it has to wait for a quiet one):
#   bench/disk-vs-nginx.sh
# Knobs (environment): DURATION=10s REPS=2 LARDER_PORT=18080 NGINX_PORT=18081 MANY_OBJECTS=100000
#   ROWS="big1 big4 range small" (a subset runs only those throughput rows)
#   QUIET_MAX=120 QUIET_BUSY=20
#   FAST_PATH=0 (larderd answers every request through hyper, for comparing its HTTP/1.1 fast path)
#   SENDFILE=0 (larderd copies large bodies through user space instead of sendfile)
# It installs nginx-light and wrk from Debian if missing, builds larderd in release mode, wipes and
# uses target/bench-disk (needs ~2.5 GiB of disk), prints a Markdown table on stdout (progress on
# stderr) and also writes it with the raw per-run numbers to target/bench-disk/results.md. Every
# server it starts is stopped on exit. Helpers: bench/wrk-bench.lua (request generator and exact
# result line for wrk), bench/fill-objects.py (the 100k PUTs), bench/startup-time.py.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
WORK=$REPO/target/bench-disk
DURATION=${DURATION:-10s}
REPS=${REPS:-2}
LPORT=${LARDER_PORT:-18080}
NPORT_ON=${NGINX_PORT:-18081}
NPORT_OFF=$((NPORT_ON + 1))
MANY=${MANY_OBJECTS:-100000}
SMALL_COUNT=200
BIG_SIZE=$((1 << 30))
RANGE_SIZE=$((64 << 20))
RSS_CLIENTS=16
BIG_PATH=/api/v1/object/bench/big
SMALL_PREFIX=/api/v1/object/bench/small-

FAST_PATH=${FAST_PATH:-1}
SENDFILE=${SENDFILE:-1}
# Only LARDER_LOG, LARDER_FAST_PATH and LARDER_SENDFILE (set below) may reach larderd: a stray
# LARDER_CONFIG or LARDER_DISK_LIMIT in the caller's environment would change what is measured.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^LARDER_' || true)

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '\ndisk-vs-nginx: FAILED: %s\n' "$*" >&2; exit 1; }
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO=sudo

# ---------------------------------------------------------------------------------------------
# 1. Tools
# ---------------------------------------------------------------------------------------------
find_nginx() { command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true; }
missing=()
[[ -n $(find_nginx) ]] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    log "installing from Debian: ${missing[*]}"
    # Debian's nginx package starts the system nginx (port 80) on install; a policy-rc.d that
    # exits 101 stops that. Leave an existing one alone, remove ours afterwards.
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    $SUDO apt-get update -qq
    pkgs=()
    for p in "${missing[@]}"; do
        if [[ $p == nginx ]]; then
            if apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=(nginx); fi
        else
            pkgs+=("$p")
        fi
    done
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2
    ((own_policy)) && $SUDO rm -f /usr/sbin/policy-rc.d
fi
NGINX=$(find_nginx)
[[ -n $NGINX ]] || die "nginx not found after installing it"

# ---------------------------------------------------------------------------------------------
# 2. Build
# ---------------------------------------------------------------------------------------------
log "building larderd (release)"
(cd "$REPO" && cargo build --release -p larderd >&2)
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/larderd
[[ -x $BIN ]] || die "no larderd binary at $BIN"

# ---------------------------------------------------------------------------------------------
# Server helpers. Every process started here is remembered in SERVERS/BG_PIDS and stopped by
# the EXIT trap, by pid.
# ---------------------------------------------------------------------------------------------
declare -A SERVERS=()
BG_PIDS=()
LARDER_PID=""
LARDER_RUN=0

alive() { # pid: running (a zombie counts as gone)
    local state
    [[ -r /proc/$1/stat ]] || return 1
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

STOP_RC=0
stop_pid() { # pid -> SIGTERM, SIGKILL after 10 s; its exit status in STOP_RC (never call in $(...))
    local pid=$1
    STOP_RC=0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || STOP_RC=$?
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for p in "${BG_PIDS[@]}"; do alive "$p" && kill -TERM "$p" 2>/dev/null; done
    for name in "${!SERVERS[@]}"; do stop_pid "${SERVERS[$name]}"; done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

larder_err_tail() { tail -n 20 "$WORK/larderd.$LARDER_RUN.err" 2>/dev/null | sed 's/^/    /'; }

start_larderd() { # data-dir
    local data=$1 out
    LARDER_RUN=$((LARDER_RUN + 1))
    out=$WORK/larderd.$LARDER_RUN.out
    port_busy "$LPORT" && die "port 127.0.0.1:$LPORT is already in use"
    # The default log level: one access line per request, as a deployment has it (nginx runs with
    # its access log off, the stricter anchor).
    LARDER_FAST_PATH=$FAST_PATH LARDER_SENDFILE=$SENDFILE LARDER_LOG=info "$BIN" --listen "127.0.0.1:$LPORT" --data-dir "$data" --shutdown-grace 5s \
        >"$out" 2>"$WORK/larderd.$LARDER_RUN.err" &
    LARDER_PID=$!
    SERVERS[larderd]=$LARDER_PID
    for _ in $(seq 1 600); do
        grep -q '^larderd listening on ' "$out" 2>/dev/null && return 0
        if ! alive "$LARDER_PID"; then
            local rc=0
            wait "$LARDER_PID" || rc=$?
            unset 'SERVERS[larderd]'
            die "larderd exited with status $rc before listening; stderr:
$(larder_err_tail)"
        fi
        sleep 0.1
    done
    die "larderd printed no 'listening' line within 60 s"
}

check_larderd() { # context: larderd must still be running
    if ! alive "$LARDER_PID"; then
        local rc=0
        wait "$LARDER_PID" || rc=$?
        unset 'SERVERS[larderd]'
        die "larderd died (exit status $rc) during: $1; its stderr:
$(larder_err_tail)"
    fi
}

stop_larderd() {
    check_larderd "the run before stopping it"
    stop_pid "$LARDER_PID"
    unset 'SERVERS[larderd]'
    [[ $STOP_RC == 0 ]] || detail "WARNING: larderd exited with status $STOP_RC after SIGTERM; stderr:
$(larder_err_tail)"
    # A few million access lines per run: keep the tail, not gigabytes of them.
    local err=$WORK/larderd.$LARDER_RUN.err
    tail -n 200 "$err" >"$err.tail" 2>/dev/null && mv "$err.tail" "$err"
}

write_nginx_conf() { # dir port mode(sendfile|nosendfile)
    local dir=$1 port=$2 mode=$3 io user_line=""
    [[ $(id -u) -eq 0 ]] && user_line="user root;" # workers must read files under $WORK
    if [[ $mode == sendfile ]]; then
        io="sendfile on; tcp_nopush on;"
    else
        io="sendfile off; output_buffers 2 1m;"
    fi
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
# Written by bench/disk-vs-nginx.sh ($mode).
daemon off;
$user_line
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path $dir/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    open_file_cache max=1000 inactive=120s;
    $io
    server {
        listen 127.0.0.1:$port;
        root $WORK/www;
        location / { }
    }
}
EOF
}

start_nginx() { # mode port
    local mode=$1 port=$2 dir=$WORK/nginx-$1 pid
    port_busy "$port" && die "port 127.0.0.1:$port is already in use"
    write_nginx_conf "$dir" "$port" "$mode"
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout" 2>&1 &
    pid=$!
    SERVERS[nginx-$mode]=$pid
    for _ in $(seq 1 100); do
        port_busy "$port" && return 0
        alive "$pid" || die "nginx ($mode) did not start: $(cat "$dir/error.log" "$dir/stdout" 2>/dev/null)"
        sleep 0.1
    done
    die "nginx ($mode) is not listening on $port after 10 s"
}

port_of() {
    case $1 in
    larderd) echo "$LPORT" ;;
    nginx-sendfile) echo "$NPORT_ON" ;;
    nginx-nosendfile) echo "$NPORT_OFF" ;;
    esac
}

server_pids() { # all processes of a server (for CPU time)
    local master=${SERVERS[$1]}
    echo "$master"
    [[ $1 == larderd ]] || ps -o pid= --ppid "$master" | tr -d ' ' || true
}

rss_pids() { # the processes whose memory serves requests: larderd, or nginx's workers
    if [[ $1 == larderd ]]; then echo "${SERVERS[larderd]}"; else ps -o pid= --ppid "${SERVERS[$1]}" | tr -d ' ' || true; fi
}

proc_ticks() { # pids... -> utime+stime clock ticks
    local t=0 p v
    for p in "$@"; do
        v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

machine_ticks() { awk '/^cpu /{t=0; for (i=2; i<=9; i++) t+=$i; print t, $5+$6}' /proc/stat; }

sum_rss_kib() { # pids... -> sum of VmRSS (KiB)
    local s=0 p v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null) || v=0
        s=$((s + ${v:-0}))
    done
    echo "$s"
}

sum_hwm_kib() {
    local s=0 p v
    for p in "$@"; do
        v=$(awk '/^VmHWM:/{print $2}' "/proc/$p/status" 2>/dev/null) || v=0
        s=$((s + ${v:-0}))
    done
    echo "$s"
}

http_expect() { # who url "code size" [curl args...]
    local who=$1 url=$2 want=$3 got
    shift 3
    got=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "$@" "$url") || true
    [[ $got == "$want" ]] || die "$who: GET $url $* answered '$got' (status, bytes), expected '$want'"
}

# ---------------------------------------------------------------------------------------------
# 3. Work dir and files
# ---------------------------------------------------------------------------------------------
for port in "$LPORT" "$NPORT_ON" "$NPORT_OFF"; do
    port_busy "$port" && die "port 127.0.0.1:$port is already in use"
done
[[ $WORK == */target/bench-disk ]] || die "refusing to wipe unexpected work dir $WORK"
rm -rf "$WORK"
WWW_DIR=$WORK/www/api/v1/object/bench
mkdir -p "$WWW_DIR" "$WORK/larder-data"
DETAILS=$WORK/details.log
: >"$DETAILS"
detail() { printf '%s\n' "$*" >>"$DETAILS"; log "$*"; }

log "generating 1 GiB + $SMALL_COUNT x 4 KiB of random bytes in $WORK/www"
head -c 1G /dev/urandom >"$WWW_DIR/big"
for i in $(seq 1 "$SMALL_COUNT"); do head -c 4096 /dev/urandom >"$WWW_DIR/small-$i"; done
[[ $(stat -c %s "$WWW_DIR/big") == "$BIG_SIZE" ]] || die "short test file"

# ---------------------------------------------------------------------------------------------
# 4. larderd: start and upload
# ---------------------------------------------------------------------------------------------
start_larderd "$WORK/larder-data"
L=http://127.0.0.1:$LPORT
log "uploading the objects to larderd"
code=$(curl -sS -o "$WORK/put-big.json" -w '%{http_code}' -T "$WWW_DIR/big" "$L$BIG_PATH") || true
[[ $code == 201 ]] || die "larderd: PUT $BIG_PATH answered $code: $(cat "$WORK/put-big.json" 2>/dev/null)"
for i in $(seq 1 "$SMALL_COUNT"); do
    code=$(curl -sS -o "$WORK/put-small.json" -w '%{http_code}' -T "$WWW_DIR/small-$i" "$L$SMALL_PREFIX$i") || true
    [[ $code == 201 ]] || die "larderd: PUT $SMALL_PREFIX$i answered $code: $(cat "$WORK/put-small.json" 2>/dev/null)"
done
check_larderd "the uploads"

# ---------------------------------------------------------------------------------------------
# 5. nginx, page cache, warm-up and correctness checks
# ---------------------------------------------------------------------------------------------
start_nginx sendfile "$NPORT_ON"
start_nginx nosendfile "$NPORT_OFF"

log "warming the page cache and checking every server's answers"
cat "$WWW_DIR"/* >/dev/null
want_big=$(md5sum <"$WWW_DIR/big" | cut -d' ' -f1)
got_big=$(curl -sS "$L$BIG_PATH" | md5sum | cut -d' ' -f1) || # larderd's warm-up GET of the big object
    die "larderd: GET $BIG_PATH failed"
[[ $got_big == "$want_big" ]] || die "larderd: GET $BIG_PATH returned different bytes (md5 $got_big, file $want_big)"
off=$((5 * RANGE_SIZE))
want_rng=$(dd if="$WWW_DIR/big" bs=1M skip=$((off >> 20)) count=64 status=none | md5sum | cut -d' ' -f1)
got_rng=$(curl -sS -H "Range: bytes=$off-$((off + RANGE_SIZE - 1))" "$L$BIG_PATH" | md5sum | cut -d' ' -f1) ||
    die "larderd: GET $BIG_PATH with a 64 MiB range failed"
[[ $got_rng == "$want_rng" ]] || die "larderd: 64 MiB range at $off returned different bytes"
cmp -s <(curl -sS "$L${SMALL_PREFIX}7") "$WWW_DIR/small-7" || die "larderd: GET ${SMALL_PREFIX}7 returned different bytes"
for srv in larderd nginx-sendfile nginx-nosendfile; do
    base=http://127.0.0.1:$(port_of "$srv")
    http_expect "$srv" "$base$BIG_PATH" "200 $BIG_SIZE"
    http_expect "$srv" "$base$BIG_PATH" "206 $RANGE_SIZE" -H "Range: bytes=$((15 * RANGE_SIZE))-$((16 * RANGE_SIZE - 1))"
    for i in $(seq 1 "$SMALL_COUNT"); do http_expect "$srv" "$base$SMALL_PREFIX$i" "200 4096"; done
done
check_larderd "the warm-up GETs"

# ---------------------------------------------------------------------------------------------
# 6. Throughput
# ---------------------------------------------------------------------------------------------
read -r -a ROWS <<< "${ROWS:-big1 big4 range small}"
declare -A ROW_NAME=(
    [big1]="1 GiB GET, 1 conn (wrk -t1 -c1)"
    [big4]="1 GiB GET, 4 conns (wrk -t2 -c4)"
    [range]="64 MiB range GET, 4 conns (wrk -t2 -c4)"
    [small]="4 KiB GET, 64 conns (wrk -t2 -c64)"
)
declare -A ROW_ARGS=(
    [big1]="1 1 full $BIG_PATH"
    [big4]="2 4 full $BIG_PATH"
    [range]="2 4 range $BIG_PATH"
    [small]="2 64 small ${SMALL_PREFIX}1"
)
declare -A ROW_TARGET=([big1]=1.2 [big4]=1.2 [range]=1.2 [small]=1.0)
declare -A BEST=() BEST_CPU=() BEST_OTHER=() ERRS=()
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)

# Other sessions may share this machine. Before each run, wait (at most QUIET_MAX seconds) for a
# second in which the machine is less than QUIET_BUSY % busy (of one core); "other processes" in
# the results then shows how much CPU the rest of the machine still took during the run.
QUIET_MAX=${QUIET_MAX:-120}
QUIET_BUSY=${QUIET_BUSY:-20}
wait_quiet() {
    local start=$SECONDS a ai b bi busy warned=0
    while :; do
        read -r a ai < <(machine_ticks)
        sleep 1
        read -r b bi < <(machine_ticks)
        busy=$(awk -v t=$((b - a)) -v i=$((bi - ai)) -v n="$NCPU" 'BEGIN{printf "%.0f", (t > 0 ? (1 - i / t) * n * 100 : 0)}')
        ((busy < QUIET_BUSY)) && return 0
        if ((SECONDS - start >= QUIET_MAX)); then
            detail "machine still ${busy}% busy after waiting ${QUIET_MAX} s; measuring anyway"
            return 0
        fi
        ((warned)) || log "machine ${busy}% busy (other processes); waiting up to ${QUIET_MAX} s for it to calm down"
        warned=1
    done
}

measure() { # row server rep
    local row=$1 srv=$2 rep=$3 port t c mode path pids p0 p1 m0 m0i m1 m1i out line kv value unit
    port=$(port_of "$srv")
    read -r t c mode path <<<"${ROW_ARGS[$row]}"
    wait_quiet
    mapfile -t pids < <(server_pids "$srv")
    p0=$(proc_ticks "${pids[@]}")
    read -r m0 m0i < <(machine_ticks)
    times >"$WORK/times.0" # CPU time of this shell's finished children, i.e. wrk after the run
    out=$(BENCH_MODE=$mode BENCH_PATH=$BIG_PATH BENCH_RANGE_SIZE=$RANGE_SIZE BENCH_OBJECT_SIZE=$BIG_SIZE \
        BENCH_PREFIX=$SMALL_PREFIX BENCH_COUNT=$SMALL_COUNT \
        wrk -t"$t" -c"$c" -d"$DURATION" --timeout 30s -s "$SCRIPT_DIR/wrk-bench.lua" \
        "http://127.0.0.1:$port$path" 2>&1) || die "wrk failed against $srv ($row): $out"
    p1=$(proc_ticks "${pids[@]}")
    read -r m1 m1i < <(machine_ticks)
    times >"$WORK/times.1"
    [[ $srv == larderd ]] && check_larderd "${ROW_NAME[$row]}"
    line=$(grep '^WRKRESULT ' <<<"$out") || die "no result line from wrk ($srv, $row): $out"
    local -A r=()
    for kv in ${line#WRKRESULT }; do r[${kv%%=*}]=${kv#*=}; done
    local errs=$((r[err_connect] + r[err_read] + r[err_write] + r[err_status] + r[err_timeout]))
    local wall_s srv_cpu machine_cpu client_cpu other_cpu
    wall_s=$(awk -v d="${r[duration_us]}" 'BEGIN{print d / 1e6}')
    srv_cpu=$(awk -v d=$((p1 - p0)) -v hz="$CLK_TCK" -v w="$wall_s" 'BEGIN{printf "%.0f", d / hz / w * 100}')
    machine_cpu=$(awk -v t=$((m1 - m0)) -v i=$((m1i - m0i)) -v n="$NCPU" 'BEGIN{printf "%.0f", (t > 0 ? (1 - i / t) * n * 100 : 0)}')
    client_cpu=$(awk -v w="$wall_s" '
        function sec(s,  m) { m = s; sub(/m.*/, "", m); sub(/^[0-9]+m/, "", s); sub(/s$/, "", s); return m * 60 + s }
        FNR == 2 { c[FILENAME] = sec($1) + sec($2) }
        END { printf "%.0f", (c[ARGV[2]] - c[ARGV[1]]) / w * 100 }' "$WORK/times.0" "$WORK/times.1")
    other_cpu=$((machine_cpu - srv_cpu - client_cpu))
    ((other_cpu > 0)) || other_cpu=0
    if [[ $row == small ]]; then
        value=$(awk -v q="${r[requests]}" -v d="${r[duration_us]}" 'BEGIN{printf "%.1f", q * 1e6 / d}')
        unit=req/s
    else
        value=$(awk -v b="${r[bytes]}" -v d="${r[duration_us]}" 'BEGIN{printf "%.0f", b * 1e6 / d}')
        unit=B/s
    fi
    detail "rep=$rep row=$row server=$srv value=$value $unit requests=${r[requests]} bytes=${r[bytes]} seconds=$wall_s errors=$errs (connect ${r[err_connect]} read ${r[err_read]} write ${r[err_write]} status ${r[err_status]} timeout ${r[err_timeout]}) p50=${r[p50_us]}us p99=${r[p99_us]}us cpu: server=${srv_cpu}% wrk=${client_cpu}% other=${other_cpu}% machine=${machine_cpu}%/$((NCPU * 100))%"
    ERRS[$row,$srv]=$((${ERRS[$row,$srv]:-0} + errs))
    if [[ -z ${BEST[$row,$srv]:-} ]] || awk -v a="$value" -v b="${BEST[$row,$srv]}" 'BEGIN{exit !(a > b)}'; then
        BEST[$row,$srv]=$value
        BEST_CPU[$row,$srv]="server ${srv_cpu}%, wrk ${client_cpu}%, other processes ${other_cpu}%, machine ${machine_cpu}%"
        BEST_OTHER[$row,$srv]=$other_cpu
    fi
}

SERVER_ORDER=(larderd nginx-sendfile nginx-nosendfile)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for rep in $(seq 1 "$REPS"); do
    for row in "${ROWS[@]}"; do
        # rotate who goes first, so no server is always measured right after the same one
        for k in 0 1 2; do
            srv=${SERVER_ORDER[$(((k + rep - 1) % 3))]}
            log "rep $rep/$REPS: ${ROW_NAME[$row]} against $srv ($DURATION)"
            measure "$row" "$srv" "$rep"
        done
    done
done

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------------------------
# 7. RSS with 16 concurrent 1 GiB downloads
# ---------------------------------------------------------------------------------------------
declare -A RSS_PEAK=() RSS_HWM=()
rss_run() { # server
    local srv=$1 url pids curl_pids=() peak=0 rss samples=0 i p rc t0 t1 hwm_note=""
    url=http://127.0.0.1:$(port_of "$srv")$BIG_PATH
    mapfile -t pids < <(rss_pids "$srv")
    for p in "${pids[@]}"; do
        echo 5 >"/proc/$p/clear_refs" 2>/dev/null || hwm_note=" (VmHWM could not be reset: since start)"
    done
    t0=$(date +%s.%N)
    for i in $(seq 1 "$RSS_CLIENTS"); do
        curl -s -o /dev/null -w '%{http_code} %{size_download}' "$url" >"$WORK/rss-$srv-$i.txt" &
        curl_pids+=($!)
        BG_PIDS+=($!)
    done
    while :; do
        rss=$(sum_rss_kib "${pids[@]}")
        ((rss > peak)) && peak=$rss
        samples=$((samples + 1))
        local running=0
        for p in "${curl_pids[@]}"; do alive "$p" && running=1 && break; done
        ((running)) || break
        sleep 0.2
    done
    t1=$(date +%s.%N)
    for p in "${curl_pids[@]}"; do wait "$p" || true; done
    BG_PIDS=()
    [[ $srv == larderd ]] && check_larderd "$RSS_CLIENTS concurrent 1 GiB downloads"
    for i in $(seq 1 "$RSS_CLIENTS"); do
        [[ $(cat "$WORK/rss-$srv-$i.txt") == "200 $BIG_SIZE" ]] ||
            die "$srv: concurrent download $i answered '$(cat "$WORK/rss-$srv-$i.txt")' (status, bytes), expected '200 $BIG_SIZE'"
    done
    RSS_PEAK[$srv]=$(awk -v k="$peak" 'BEGIN{printf "%.1f", k / 1024}')
    RSS_HWM[$srv]=$(awk -v k="$(sum_hwm_kib "${pids[@]}")" 'BEGIN{printf "%.1f", k / 1024}')
    detail "rss server=$srv peak_sampled=${RSS_PEAK[$srv]}MiB VmHWM=${RSS_HWM[$srv]}MiB$hwm_note samples=$samples processes=${#pids[@]} $RSS_CLIENTS x 1 GiB in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f s (%.2f GiB/s aggregate)", b - a, '"$RSS_CLIENTS"' / (b - a)}')"
}
for srv in "${SERVER_ORDER[@]}"; do
    log "RSS: $RSS_CLIENTS concurrent 1 GiB downloads from $srv"
    wait_quiet
    rss_run "$srv"
done

# ---------------------------------------------------------------------------------------------
# 8. Start-up time with many objects
# ---------------------------------------------------------------------------------------------
for srv in nginx-sendfile nginx-nosendfile; do stop_pid "${SERVERS[$srv]}"; unset "SERVERS[$srv]"; done
stop_larderd
MANY_DIR=$WORK/larder-many
start_larderd "$MANY_DIR"
log "uploading $MANY objects of 100 B (bench/fill-objects.py)"
fill_out=$(python3 "$SCRIPT_DIR/fill-objects.py" "127.0.0.1:$LPORT" many "$MANY" 100 16 2>&1) ||
    { check_larderd "the $MANY small uploads"; die "uploading $MANY objects to larderd failed: $fill_out"; }
detail "$fill_out"
stop_larderd
MANY_FILES=$(find "$MANY_DIR" -type f | wc -l)
MANY_DU=$(du -sh "$MANY_DIR" | cut -f1)
detail "data dir $MANY_DIR: $MANY_FILES files, $MANY_DU"

startup_once() { # label
    local t
    LARDER_RUN=$((LARDER_RUN + 1))
    t=$(LARDER_LOG=warn python3 "$SCRIPT_DIR/startup-time.py" "$MANY" "$WORK/larderd.$LARDER_RUN.err" -- \
        "$BIN" --listen "127.0.0.1:$LPORT" --data-dir "$MANY_DIR" --shutdown-grace 5s) ||
        die "larderd start-up with $MANY objects ($1) failed; stderr:
$(larder_err_tail)"
    detail "startup $1: serving after ${t% *} s, index loaded after ${t#* } s"
    echo "$t"
}
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END{print (NR % 2 ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2)}'; }

log "start-up time, warm page cache (3 runs)"
warm=()
for i in 1 2 3; do
    wait_quiet
    warm+=("$(startup_once "warm run $i")")
done
STARTUP_WARM=$(median "${warm[@]% *}")
LOADED_WARM=$(median "${warm[@]#* }")
STARTUP_COLD=""
COLD_NOTE=""
cold=()
for i in 1 2 3; do
    wait_quiet
    sync
    if ! drop_err=$( (echo 3 | $SUDO tee /proc/sys/vm/drop_caches >/dev/null) 2>&1); then
        COLD_NOTE="cold run not measured: writing /proc/sys/vm/drop_caches failed: ${drop_err:-permission denied}"
        detail "$COLD_NOTE"
        break
    fi
    cold+=("$(startup_once "cold run $i (after drop_caches)")")
done
if ((${#cold[@]})); then
    STARTUP_COLD=$(median "${cold[@]% *}")
    LOADED_COLD=$(median "${cold[@]#* }")
fi

# ---------------------------------------------------------------------------------------------
# 9. Table
# ---------------------------------------------------------------------------------------------
gib() { awk -v b="$1" 'BEGIN{printf "%.2f GiB/s", b / 1073741824}'; }
fmt() { if [[ $1 == small ]]; then awk -v v="$2" 'BEGIN{printf "%.0f req/s", v}'; else gib "$2"; fi; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN{exit !(a >= b)}'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN{exit !(a < b)}'; }

RESULTS=$WORK/results.md
{
    echo "| row | larderd | nginx best (mode) | larderd/nginx | target | met |"
    echo "| --- | ---: | ---: | ---: | --- | --- |"
    for row in "${ROWS[@]}"; do
        l=${BEST[$row,larderd]}
        on=${BEST[$row,nginx-sendfile]}
        off=${BEST[$row,nginx-nosendfile]}
        if ge "$on" "$off"; then n=$on nmode="sendfile on"; else n=$off nmode="sendfile off"; fi
        ratio=$(awk -v a="$l" -v b="$n" 'BEGIN{printf "%.2f", a / b}')
        met=no
        ge "$ratio" "${ROW_TARGET[$row]}" && met=yes
        errnote=""
        for srv in "${SERVER_ORDER[@]}"; do
            ((${ERRS[$row,$srv]:-0} == 0)) || errnote+=" ($srv: ${ERRS[$row,$srv]} wrk errors)"
        done
        noisy=""
        for srv in "${SERVER_ORDER[@]}"; do
            ((${BEST_OTHER[$row,$srv]:-0} <= 30)) || noisy+=" $srv ${BEST_OTHER[$row,$srv]}%"
        done
        [[ -z $noisy ]] || errnote+=" (noisy: other processes took${noisy} of a core during the best run)"
        echo "| ${ROW_NAME[$row]} | $(fmt "$row" "$l") | $(fmt "$row" "$n") ($nmode) | ${ratio}× | ≥ ${ROW_TARGET[$row]}× | $met$errnote |"
    done
    l=${RSS_PEAK[larderd]}
    on=${RSS_PEAK[nginx-sendfile]}
    off=${RSS_PEAK[nginx-nosendfile]}
    if lt "$on" "$off"; then n=$on nmode="sendfile on"; else n=$off nmode="sendfile off"; fi
    met=no
    lt "$l" 100 && met=yes
    echo "| Peak RSS, $RSS_CLIENTS concurrent 1 GiB downloads (sampled every 0.2 s; nginx = sum of workers) | $l MiB | $n MiB ($nmode) | $(awk -v a="$l" -v b="$n" 'BEGIN{printf "%.1f", (b > 0 ? a / b : 0)}')× | < 100 MiB | $met |"
    met=no
    lt "$STARTUP_WARM" 2 && met=yes
    echo "| Start-up, $MANY objects, warm page cache (median of 3): serving | $STARTUP_WARM s | — | — | < 2 s | $met |"
    echo "| … index fully loaded in the background | $LOADED_WARM s | — | — | — | — |"
    if [[ -n $STARTUP_COLD ]]; then
        met=no
        lt "$STARTUP_COLD" 2 && met=yes
        echo "| Start-up, $MANY objects, cold page cache (median of 3, after drop_caches): serving | $STARTUP_COLD s | — | — | < 2 s | $met |"
        echo "| … index fully loaded in the background | $LOADED_COLD s | — | — | — | — |"
    else
        echo "| Start-up, $MANY objects, cold page cache | not measured | — | — | < 2 s | $COLD_NOTE |"
    fi
} >"$WORK/table.md"

{
    echo "Run: $(date -u); $(nproc) cores, kernel $(uname -r), $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo); $(awk '/^MemTotal/{printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)"
    echo "larderd at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') ($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) uncommitted paths in the work tree); $("$NGINX" -v 2>&1); $(wrk -v 2>&1 | head -n1 | cut -d' ' -f1,2); best of $REPS × $DURATION per server and row; load average $LOAD_BEFORE before the throughput rows, $LOAD_AFTER after"
    echo
    cat "$WORK/table.md"
    echo
    echo "CPU during each server's best run (% of one core; the machine has $((NCPU * 100))%; \"other processes\" = machine busy - server - wrk, i.e. whatever else ran on the machine):"
    for row in "${ROWS[@]}"; do
        for srv in "${SERVER_ORDER[@]}"; do echo "- $row, $srv: ${BEST_CPU[$row,$srv]}"; done
    done
    echo
    echo "All runs:"
    echo '```'
    cat "$DETAILS"
    echo '```'
} >"$RESULTS"

cat "$RESULTS"
log "done; results also in $RESULTS"
