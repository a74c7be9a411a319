# bench/lib-nginx-static.sh — sourced, not run: the nginx the small-object benchmarks compare
# larderd with, so that all of them measure the same anchor. nginx as a platform team would
# configure it for static files: sendfile, open_file_cache, keep-alive without a request limit.
#
#   nginx_static_conf DIR ROOT PORT [ACCESS_LOG_DIRECTIVE] > DIR/nginx.conf
#   nginx -p DIR -c DIR/nginx.conf -e DIR/error.log &
#
# DIR holds nginx's pid, error log and temp files (DIR/tmp is created); ROOT is served at
# http://127.0.0.1:PORT/. The access log is off unless a directive is given (for example
# "access_log /dev/null combined buffer=64k flush=1s;"). NGINX_OPEN_FILES sets open_file_cache's
# max (1000, nginx's documented example, unless given): raise it for a working set of more files.
nginx_static_conf() {
    local dir=$1 root=$2 port=$3 access_log=${4:-"access_log off;"}
    mkdir -p "$dir/tmp"
    cat <<CONF
daemon off;
$([[ $(id -u) -eq 0 ]] && echo "user root;")
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    $access_log
    default_type application/octet-stream;
    client_body_temp_path $dir/tmp;
    keepalive_requests 1000000;
    open_file_cache max=${NGINX_OPEN_FILES:-1000} inactive=120s;
    sendfile on; tcp_nopush on;
    server { listen 127.0.0.1:$port; root $root; location / { } }
}
CONF
}

# Installs nginx-light and wrk from Debian when either is missing.
ensure_nginx_and_wrk() {
    command -v wrk >/dev/null && command -v nginx >/dev/null && return 0
    apt-get update -qq && apt-get install -y -qq nginx-light wrk >/dev/null
}
