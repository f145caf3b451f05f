# Sourced by perf/scale and perf/scale-ab: one etcd member on loopback for a benchmark run.
#   etcd_start DIR   starts /usr/bin/etcd with its data and log (etcd.log) in DIR, on a client port in 20000-29999
#                    (below the ephemeral range, where the replicas' ports come from) and the next one for peers;
#                    waits until it answers /health (60 s at most). Sets etcd_pid and etcd_url; on failure prints
#                    its log to stderr and returns 1.
etcd_start() {
  local dir=$1 cport pport
  cport=$((20000 + RANDOM % 10000)); pport=$((cport + 1))
  /usr/bin/etcd --name s --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$cport" \
    --advertise-client-urls "http://127.0.0.1:$cport" --listen-peer-urls "http://127.0.0.1:$pport" \
    --initial-advertise-peer-urls "http://127.0.0.1:$pport" --initial-cluster "s=http://127.0.0.1:$pport" \
    --quota-backend-bytes 4294967296 --log-level error --logger zap >"$dir/etcd.log" 2>&1 &
  etcd_pid=$!
  etcd_url="http://127.0.0.1:$cport"
  for _ in $(seq 600); do curl -sf "$etcd_url/health" >/dev/null && return 0; sleep 0.1; done
  cat "$dir/etcd.log" >&2
  echo "etcd did not start" >&2
  kill "$etcd_pid" 2>/dev/null
  return 1
}
