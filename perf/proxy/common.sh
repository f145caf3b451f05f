# Shared by perf/proxy/bulk and perf/proxy/syscalls (sourced). Builds the bench tool, starts processes that
# are stopped on exit (by their PIDs), and cleans up the namespaces a run created.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$ROOT/perf/out/proxy"
mkdir -p "$OUT"
PIDS=()
NAMESPACES=()

cleanup() {
  for pid in "${PIDS[@]:-}"; do [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]:-}"; do [[ -n "$pid" ]] && wait "$pid" 2>/dev/null || true; done
  for ns in "${NAMESPACES[@]:-}"; do [[ -n "$ns" ]] && ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

need_haproxy() {
  if ! command -v haproxy >/dev/null; then "$ROOT/scripts/bootstrap" --perf; fi
}

build_bench() {
  ("$ROOT/perf/build" mesh-proxy-bench 2>&1 \
    | grep -E "error|warning: .*swift" || true)
  BIN="$ROOT/perf/.build/release/mesh-proxy-bench"
  [[ -x "$BIN" ]] || { echo "build failed" >&2; exit 1; }
}

# start LOGNAME CMD...: runs CMD in the background, output to $OUT/LOGNAME.log; its PID in $LAST_PID.
start() {
  local name=$1; shift
  "$@" >"$OUT/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# wait_port [NETNS] HOST PORT: until something accepts there (10 s).
wait_port() {
  local ns="" host port
  if [[ $# -eq 3 ]]; then ns=$1; shift; fi
  host=$1; port=$2
  for _ in $(seq 1 200); do
    if [[ -n "$ns" ]]; then
      ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null && return 0
    else
      bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null && return 0
    fi
    sleep 0.05
  done
  echo "nothing listens on $host:$port" >&2; exit 1
}

# haproxy_config FILE MODE LISTEN BACKEND: one frontend, one server, one thread (as our proxy).
haproxy_config() {
  cat >"$1" <<CFG
global
  nbthread 1
  maxconn 1000
defaults
  mode $2
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend f
  bind $3
  default_backend b
backend b
  server s1 $4
CFG
}

# nginx_preamble DIR: nginx in the foreground, one process, its pid file and error log in DIR.
nginx_preamble() {
  cat <<NGINX
daemon off;
master_process off;
worker_processes 1;
pid $1/nginx.pid;
error_log $1/nginx-error.log warn;
events { worker_connections 1024; }
NGINX
}

# nginx_stream_config FILE DIR LISTEN BACKEND: a TCP stream proxy (as perf/run's), after nginx_preamble DIR.
nginx_stream_config() {
  {
    echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
    nginx_preamble "$2"
    echo "stream { server { listen $3; proxy_pass $4; } }"
  } >"$1"
}

# nginx_http_config FILE DIR LISTEN BACKEND: an HTTP proxy as perf/run's (upstream keep-alive, X-Forwarded-For
# and X-Request-Id added, as ours does by default), after nginx_preamble DIR; temp files in DIR.
nginx_http_config() {
  {
    nginx_preamble "$2"
    cat <<NGINX
http {
  access_log off;
  client_body_temp_path $2/body; proxy_temp_path $2/proxy;
  fastcgi_temp_path $2/fcgi; uwsgi_temp_path $2/uwsgi; scgi_temp_path $2/scgi;
  keepalive_requests 100000000; keepalive_timeout 300s;
  upstream b { server $4; keepalive 32; keepalive_requests 100000000; }
  server {
    listen $3;
    location / {
      proxy_pass http://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Request-Id \$request_id;
    }
  }
}
NGINX
  } >"$1"
}

# free_port: a loopback TCP port free just now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The PID of the process a `ip netns exec ... CMD` wrapper became (exec replaces it, so the same PID).
