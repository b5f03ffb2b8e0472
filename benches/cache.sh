#!/usr/bin/env bash
# Response cache benchmark (SPEC 14): cached hits through balancer against nginx
# `proxy_cache` (cache directory on tmpfs) on the same small response, side by side in one
# run, and balancer proxying the same request uncached. Reports req/s (median of REPEAT
# runs) and the proxy's CPU time per request (utime + stime from /proc, over the runs).
# Installs wrk and nginx (Debian packages) if missing.
#
#   benches/cache.sh                       # 5 s runs, 3 repeats, 50 connections, 2 workers
#   WORKERS=1 DURATION=10s benches/cache.sh
#   NO_BUILD=1 benches/cache.sh            # use the release binaries already built
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-50}
WORKERS=${WORKERS:-2}
OUT=${OUT:-target/cache-bench}
SHM=${SHM:-/dev/shm/balancer-cache-bench}
mkdir -p "$OUT"

. benches/install.sh
install_missing wrk nginx
[ -n "${NO_BUILD:-}" ] || cargo build --release -q --bin balancer --example demo_backend
BAL=target/release/balancer
DEMO=target/release/examples/demo_backend
ulimit -n 65536 2>/dev/null || true

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$SHM"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# nginx's CPU is its workers' (the master does nothing per request).
nginx_ticks() { local s=0; for p in $(pgrep -P "$1"); do s=$((s + $(cpu_ticks "$p"))); done; echo $s; }

ORIGIN=19021
"$DEMO" --port $ORIGIN --cache-control "s-maxage=600" >/dev/null & pids+=($!)
wait_port $ORIGIN

# balancer: one listener with the cache on its route, one without (the proxied figure).
cat > "$OUT/balancer.toml" <<CFG
[server]
listen = ["127.0.0.1:19121", "127.0.0.1:19122"]
workers = $WORKERS
[admin]
listen = "127.0.0.1:19129"
[log]
access = false
[upstreams.app]
backends = ["http://127.0.0.1:$ORIGIN"]
keepalive = 256
[caches.edge]
max_size = "256MiB"
max_object = "8MiB"
[[routes]]
path_prefix = "/cached"
upstream = "app"
cache = "edge"
[[routes]]
path_prefix = "/"
upstream = "app"
CFG
"$BAL" -c "$OUT/balancer.toml" 2>"$OUT/balancer.log" & pids+=($!); BAL_PID=$!
wait_port 19121

rm -rf "$SHM"; mkdir -p "$SHM" "$OUT/nginx"
. benches/nginx_conf.sh
nginx_conf "$PWD/$OUT/nginx" "$WORKERS" 19123 "$ORIGIN" "" \
  "proxy_cache_path $SHM levels=1:2 keys_zone=edge:10m max_size=256m;" \
  "proxy_cache edge; proxy_cache_lock on; add_header Cache-Status \$upstream_cache_status always;"
nginx -c "$PWD/$OUT/nginx/nginx.conf" -p "$PWD/$OUT/nginx" -g "daemon off;" 2>>"$OUT/nginx/stderr" & pids+=($!); NGINX_PID=$!
wait_port 19123

# Warm both caches and check that they answer hits.
curl -s -o /dev/null http://127.0.0.1:19121/cached/item; curl -s -o /dev/null http://127.0.0.1:19123/cached/item
curl -s -D - -o /dev/null http://127.0.0.1:19121/cached/item | grep -qi '^cache-status: balancer; hit' || { echo "balancer: no hit"; exit 1; }
curl -s -D - -o /dev/null http://127.0.0.1:19123/cached/item | grep -qi '^cache-status: HIT' || { echo "nginx: no hit"; exit 1; }

run_wrk() { # url -> "rps"
  wrk -t2 -c"$CONNS" -d"$DURATION" -s benches/load/report.lua "$1" 2>/dev/null | awk '/^RESULT/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["rps"], v["p50"], v["p99"] }'
}
median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
hz=$(getconf CLK_TCK)

printf '\n| target | req/s | p50 ms | p99 ms | proxy CPU per request (µs) |\n|---|---|---|---|---|\n'
for target in balancer-hit nginx-hit balancer-proxied; do
  case $target in
    balancer-hit) url=http://127.0.0.1:19121/cached/item; ticks() { cpu_ticks $BAL_PID; } ;;
    nginx-hit) url=http://127.0.0.1:19123/cached/item; ticks() { nginx_ticks $NGINX_PID; } ;;
    balancer-proxied) url=http://127.0.0.1:19122/plain/item; ticks() { cpu_ticks $BAL_PID; } ;;
  esac
  runs="$OUT/runs-$target.txt"; : > "$runs"
  t0=$(ticks)
  for _ in $(seq "$REPEAT"); do run_wrk "$url" >> "$runs"; done
  t1=$(ticks)
  total=$(awk -v d="${DURATION%s}" '{s += $1 * d} END {print s}' "$runs")
  rps=$(awk '{print $1}' "$runs" | median); p50=$(awk '{print $2}' "$runs" | median); p99=$(awk '{print $3}' "$runs" | median)
  cpu=$(awk -v t=$((t1 - t0)) -v hz="$hz" -v n="$total" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  printf '| %s | %.0f | %.3f | %.3f | %s |\n' "$target" "$rps" "$p50" "$p99" "$cpu"
done
echo
echo "Medians of $REPEAT runs of $DURATION, $CONNS connections, $WORKERS workers, wrk -t2 on the same machine ($(nproc) cores)."
curl -s http://127.0.0.1:19129/metrics | grep '^balancer_cache' || true
