#!/usr/bin/env bash
# Load with a rate limit that admits everything: local, then shared through a redis-server
# on loopback, side by side in one run (wrk, keep-alive, one key per connection's client
# IP: 127.0.0.1). Installs wrk and redis-server (Debian packages) if they are missing.
#
#   benches/shared_limit_load.sh            # 5 s runs, 3 repeats, 50 connections
#   DURATION=10s REPEAT=5 CONNS=100 benches/shared_limit_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-50}
WORKERS=${WORKERS:-1}

. benches/install.sh
install_missing wrk redis-server
cargo build --release -q --bin balancer --example demo_backend
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

redis-server --port 19390 --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" >/dev/null & pids+=($!)
target/release/examples/demo_backend --port 19391 >/dev/null & pids+=($!)
sleep 0.5

config() { # $1: shared (true/false)
  cat <<EOF
[server]
listen = "127.0.0.1:19392"
workers = $WORKERS
rate_limit = "all"
[admin]
listen = "off"
[log]
access = false
level = "warn"
[upstreams.app]
backends = ["http://127.0.0.1:19391"]
[limit_store]
url = "redis://127.0.0.1:19390/0"
timeout = "50ms"
on_error = "deny"
[rate_limits.all]
rate = 1000000000
per = "1s"
shared = $1
EOF
}

run() { # $1: shared; prints the median requests/s, p50 and p99 latency
  config "$1" > "$tmp/balancer.toml"
  target/release/balancer -c "$tmp/balancer.toml" & local pid=$!
  sleep 1
  for _ in $(seq "$REPEAT"); do
    wrk -t2 -c"$CONNS" -d"$DURATION" --latency http://127.0.0.1:19392/ |
      awk '/Requests\/sec/ {r=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} /Non-2xx/ {bad=$4} END {print r, p50, p99, bad+0}'
  done | sort -n | awk -v label="$2" '{a[NR]=$0} END {split(a[int((NR+1)/2)], m, " "); printf "%-7s %10s req/s  p50 %-8s p99 %-8s non-2xx %s\n", label, m[1], m[2], m[3], m[4]}'
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

echo "Medians of $REPEAT runs of $DURATION, $CONNS connections, $WORKERS worker(s), $(nproc) cores:"
run false local
run true shared
