#!/usr/bin/env bash
# CPU instructions per proxied request, counted by callgrind: balancer and nginx, one
# worker each, keep-alive, in front of the same instant backend. Instruction counts do not
# depend on what else the machine is doing, so small changes to the request path show up
# here when req/s is lost in the noise. Installs valgrind and nginx if missing.
#
#   benches/instructions.sh                  # both, 6 s of wrk -c10 each after a warm-up
#   TARGETS=balancer benches/instructions.sh
#   TARGETS="balancer balancer-otlp balancer-otlp-down" benches/instructions.sh
#     balancer-otlp: a span per request exported to a collector that accepts them (the
#     demo backend answers the POSTs 200), the exporter task's work included;
#     balancer-otlp-down: exported to a closed port (every batch fails to connect).
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/nginx_conf.sh
TARGETS=${TARGETS:-"balancer nginx"}
DURATION=${DURATION:-6s}
OUT=${OUT:-target/instructions}
mkdir -p "$OUT"
. benches/install.sh
install_missing valgrind wrk nginx
cargo build --release -q --bin balancer --example demo_backend

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
target/release/examples/demo_backend --port 19301 >/dev/null & pids+=($!)

cat > "$OUT/balancer.toml" <<CFG
[server]
listen = "127.0.0.1:19302"
workers = 1
[log]
access = false
[upstreams.app]
backends = ["http://127.0.0.1:19301"]
keepalive = 64
CFG
for t in otlp otlp-down; do
  port=19301; [ $t = otlp-down ] && port=19309
  sed "s/19302/19304/" "$OUT/balancer.toml" > "$OUT/balancer-$t.toml"
  printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\n' $port >> "$OUT/balancer-$t.toml"
done
nginx_conf "$PWD/$OUT/nginx" 1 19303 19301 "master_process off; daemon off;"

measure() { # name port command...
  local name=$1 port=$2; shift 2
  rm -f "$OUT/$name.cg"*
  valgrind --tool=callgrind --callgrind-out-file="$OUT/$name.cg" "$@" >"$OUT/$name.log" 2>&1 & local pid=$!
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  wrk -t1 -c10 -d2s "http://127.0.0.1:$port/" >/dev/null          # warm-up, not counted
  callgrind_control -z "$pid" >/dev/null 2>&1
  local n; n=$(wrk -t1 -c10 -d"$DURATION" "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  local ir; ir=$(callgrind_annotate "$OUT/$name.cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  printf '%-18s %8d requests  %6d instructions per request\n' "$name" "$n" $((ir / n))
}

for t in $TARGETS; do
  case $t in
    balancer) measure balancer 19302 target/release/balancer -c "$OUT/balancer.toml" ;;
    balancer-otlp) measure balancer-otlp 19304 target/release/balancer -c "$OUT/balancer-otlp.toml" ;;
    balancer-otlp-down) measure balancer-otlp-down 19304 target/release/balancer -c "$OUT/balancer-otlp-down.toml" ;;
    nginx) measure nginx 19303 nginx -c "$PWD/$OUT/nginx/nginx.conf" -p "$PWD/$OUT/nginx" ;;
  esac
done
echo "(callgrind; profiles in $OUT/*.cg.1, read them with callgrind_annotate --inclusive=yes)"
