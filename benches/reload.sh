#!/usr/bin/env bash
# Reloads of a large config: CPU time per reload (POST /reload, the whole path: read,
# parse, validate, build, swap) with BACKENDS backends in one upstream, for each strategy,
# and the p99 of keep-alive traffic through another upstream of the same balancer with
# and without a reload every 200 ms (and with the same loop calling GET /healthz instead,
# for the cost of the loop itself).
#
#   benches/reload.sh                       # 10,000 backends
#   BACKENDS=1000 RELOADS=50 benches/reload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BACKENDS:-10000}
RELOADS=${RELOADS:-20}
DURATION=${DURATION:-5s}
REPEAT=${REPEAT:-3}
OUT=${OUT:-target/reload}
mkdir -p "$OUT"

. benches/install.sh
install_missing wrk curl
cargo build --release -q --bin balancer --example demo_backend
BAL=target/release/balancer
ulimit -n 65536 2>/dev/null || true

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
target/release/examples/demo_backend --port 19001 >/dev/null & pids+=($!)

config() { # strategy
  python3 - "$N" "$1" <<'PY'
import sys
n, strategy = int(sys.argv[1]), sys.argv[2]
print('[server]\nlisten = "127.0.0.1:19101"\nworkers = 2\n[admin]\nlisten = "127.0.0.1:19199"\n[log]\naccess = false\n')
print('[upstreams.app]\nbackends = ["http://127.0.0.1:19001"]\nkeepalive = 256\n')
print(f'[upstreams.big]\nstrategy = "{strategy}"\nbackends = [')
for i in range(n):  # addresses nobody listens on: never picked, no health checks
    print(f'  "http://127.{1 + i // 60000}.{(i // 250) % 240}.{1 + i % 250}:{8000 + i % 7}",')
print(']\n[[routes]]\npath_prefix = "/big"\nupstream = "big"\n[[routes]]\npath_prefix = "/"\nupstream = "app"')
PY
}

start() { # strategy
  config "$1" > "$OUT/balancer.toml"
  "$BAL" -c "$OUT/balancer.toml" 2>"$OUT/balancer.log" & pids+=($!); BAL_PID=$!
  for _ in $(seq 200); do curl -sf -o /dev/null http://127.0.0.1:19199/healthz && return 0; sleep 0.05; done
  echo "balancer did not start" >&2; exit 1
}
stop() { kill "$BAL_PID"; wait "$BAL_PID" 2>/dev/null || true; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$BAL_PID/stat"; }
reload() { curl -sf -XPOST http://127.0.0.1:19199/reload >/dev/null; }

echo "| strategy | backends | CPU per reload (ms) | wall per reload (ms) |"
echo "|---|---|---|---|"
for strategy in round-robin least-connections least-latency consistent-hash; do
  start "$strategy"
  reload
  c0=$(cpu_ticks); t0=$(date +%s%N)
  for _ in $(seq "$RELOADS"); do reload; done
  t1=$(date +%s%N); c1=$(cpu_ticks)
  tick_ms=$(( 1000 / $(getconf CLK_TCK) ))
  echo "| $strategy | $N | $(awk -v c=$((c1 - c0)) -v t=$tick_ms -v r="$RELOADS" 'BEGIN {printf "%.1f", c * t / r}') | $(awk -v d=$((t1 - t0)) -v r="$RELOADS" 'BEGIN {printf "%.1f", d / 1e6 / r}') |"
  stop
done

p99() { wrk -t2 -c50 -d"$DURATION" --latency http://127.0.0.1:19101/ | awk '/ 99%/ {print $2} /Requests\/sec/ {print $2}' | paste -sd' '; }
echo
echo "keep-alive traffic through the other upstream (wrk -t2 -c50 $DURATION, $REPEAT runs each):"
start round-robin
for i in $(seq "$REPEAT"); do
  echo "  no reloads:                $(p99)   (p99, req/s)"
  # The loop's own cost (curl started 5 times a second on the same two cores), apart:
  ( while true; do curl -sf -o /dev/null http://127.0.0.1:19199/healthz || true; sleep 0.2; done ) & loop=$!
  echo "  GET /healthz every 200 ms: $(p99)   (p99, req/s)"
  kill $loop; wait $loop 2>/dev/null || true
  ( while true; do reload || true; sleep 0.2; done ) & loop=$!
  echo "  a reload every 200 ms:     $(p99)   (p99, req/s)"
  kill $loop; wait $loop 2>/dev/null || true
done
echo "  reloads done: $(grep -c 'config reloaded' "$OUT/balancer.log")"
stop
