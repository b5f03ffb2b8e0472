#!/usr/bin/env bash
# A traffic spike of 10x an app's capacity, side by side in one run (issue 17): gunicorn
# with 2 sync workers and a 20 ms endpoint (capacity about 100 req/s), hit by wrk with 200
# connections through balancer with max_inflight = 2 and a 1 s queue, through balancer
# without a cap, and through nginx. Reports successful answers per second, non-2xx answers
# (balancer's 503s), requests with no answer (wrk's timeout is 3 s), p50/p99 of every
# answer, and the app's own peak concurrency. Installs wrk, nginx and gunicorn if missing.
#
#   benches/peak.sh                 # 15 s per target
#   DURATION=5s benches/peak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/nginx_conf.sh
DURATION=${DURATION:-15s}
OUT=${OUT:-target/peak}
mkdir -p "$OUT"
. benches/install.sh
install_missing wrk nginx
command -v gunicorn >/dev/null || python3 -m pip install -q gunicorn
cargo build --release -q --bin balancer

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

APP_PORT=19401
rm -rf "$OUT/app" && mkdir -p "$OUT/app"
PEAK_DIR="$PWD/$OUT/app" gunicorn -w 2 -b 127.0.0.1:$APP_PORT --chdir tests/apps --backlog 2048 \
  --log-level warning peak_app:app & pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$APP_PORT/peak" >/dev/null && break; sleep 0.1; done

config() { # port extra
  cat <<CFG
[server]
listen = "127.0.0.1:$1"
workers = 1
[admin]
listen = "off"
[log]
access = false
[upstreams.app]
backends = ["http://127.0.0.1:$APP_PORT"]
$2
CFG
}
config 19402 $'max_inflight = 2\n[upstreams.app.queue]\nmax = 1000\ntimeout = "1s"' > "$OUT/capped.toml"
config 19403 "" > "$OUT/uncapped.toml"
target/release/balancer -c "$OUT/capped.toml" 2>/dev/null & pids+=($!)
target/release/balancer -c "$OUT/uncapped.toml" 2>/dev/null & pids+=($!)
nginx_conf "$PWD/$OUT/nginx" 1 19404 $APP_PORT "daemon off;"
nginx -c "$PWD/$OUT/nginx/nginx.conf" -p "$PWD/$OUT/nginx" & pids+=($!)
sleep 1

cat > "$OUT/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local failed = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  local ok = summary.requests - summary.errors.status
  io.write(string.format("%.1f %d %d %.1f %.1f\n", ok / secs, summary.errors.status, failed,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
LUA

printf '| target | 2xx/s | non-2xx (503) | no answer (timeouts, resets) | p50 ms | p99 ms | app peak |\n|---|---|---|---|---|---|---|\n'
for t in "balancer, max_inflight 2 + queue:19402" "balancer, no cap:19403" "nginx:19404"; do
  name=${t%%:*}; port=${t##*:}
  curl -s "http://127.0.0.1:$APP_PORT/reset" >/dev/null
  read -r ok shed failed p50 p99 < <(wrk -t2 -c200 -d"$DURATION" --timeout 3s -s "$OUT/report.lua" \
    "http://127.0.0.1:$port/sleep?ms=20" | tail -1)
  peak=$(curl -s "http://127.0.0.1:$APP_PORT/peak")
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$ok" "$shed" "$failed" "$p50" "$p99" "$peak"
  sleep 2
done
