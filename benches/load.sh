#!/usr/bin/env bash
# Load benchmark: direct-to-backend, balancer, nginx and HAProxy doing the same job on this
# machine, side by side in one run. Installs wrk, nginx and haproxy (Debian packages) if
# they are missing. Prints a table of medians with ratios to direct and to nginx, and
# balancer's resident memory idle, under load and with 10,000 idle keep-alive clients.
#
#   benches/load.sh                 # defaults: 5s runs, 3 repeats, 50 connections
#   DURATION=10s REPEAT=5 benches/load.sh
#   BACKENDS=fast MODES=keepalive TARGETS="balancer nginx" IDLE_CONNS=0 benches/load.sh  # a quick A/B
#   ACCESS_LOG=on benches/load.sh   # balancer and nginx write an access-log line per request
#                                   # to a file (nginx: buffer=64k); HAProxy logs only to
#                                   # syslog, so its rows stay without one
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/nginx_conf.sh
DURATION=${DURATION:-5s}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-50}
IDLE_CONNS=${IDLE_CONNS:-10000}
WORKERS_LIST=${WORKERS_LIST:-"1 2"}
BACKENDS=${BACKENDS:-"fast slow"}
MODES=${MODES:-"keepalive close"}
TARGETS=${TARGETS:-"direct balancer nginx haproxy"}
ACCESS_LOG=${ACCESS_LOG:-off}
OUT=${OUT:-target/load}
mkdir -p "$OUT"

. benches/install.sh
install_missing wrk nginx haproxy
cargo build --release -q --bin balancer --example demo_backend
BAL=target/release/balancer
DEMO=target/release/examples/demo_backend
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

FAST=19001; SLOW=19002
"$DEMO" --port $FAST >/dev/null & pids+=($!)
"$DEMO" --port $SLOW --latency 2ms >/dev/null & pids+=($!)
sleep 0.5

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; return 1; }

start_balancer() { # workers port backend_port
  cat > "$OUT/balancer.toml" <<CFG
[server]
listen = "127.0.0.1:$2"
workers = $1
[admin]
listen = "127.0.0.1:19199"
[log]
access = $([ "$ACCESS_LOG" = on ] && echo true || echo false)
[upstreams.app]
backends = ["http://127.0.0.1:$3"]
keepalive = 256
CFG
  "$BAL" -c "$OUT/balancer.toml" 2>"$OUT/balancer.log" & pids+=($!); BAL_PID=$!
  wait_port "$2"
}

start_nginx() { # workers port backend_port
  local log=""
  [ "$ACCESS_LOG" = on ] && log="access_log $PWD/$OUT/nginx/access.log combined buffer=64k;"
  nginx_conf "$PWD/$OUT/nginx" "$1" "$2" "$3" "" "" "$log"
  nginx -c "$PWD/$OUT/nginx/nginx.conf" -p "$PWD/$OUT/nginx" -g "daemon off;" 2>>"$OUT/nginx/stderr" & pids+=($!); NGINX_PID=$!
  wait_port "$2"
}

start_haproxy() { # workers port backend_port
  cat > "$OUT/haproxy.cfg" <<CFG
global
  nbthread $1
  maxconn 9000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 30s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:$2
  # The same header work as balancer's and nginx's (see benches/nginx_conf.sh).
  unique-id-format %{+X}o\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
  http-request set-header X-Request-Id %[unique-id] unless { req.hdr(x-request-id) -m found }
  http-request set-var(txn.rid) req.hdr(x-request-id)
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-response set-header X-Request-Id %[var(txn.rid)]
  default_backend be
backend be
  server s1 127.0.0.1:$3
CFG
  haproxy -f "$OUT/haproxy.cfg" -db 2>"$OUT/haproxy.log" & pids+=($!); HAPROXY_PID=$!
  wait_port "$2"
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

run_wrk() { # url mode -> "rps p50 p99 p999"
  local extra=()
  [ "$2" = close ] && extra=(-H "Connection: close")
  wrk -t2 -c"$CONNS" -d"$DURATION" -s benches/load/report.lua "${extra[@]}" "$1" 2>/dev/null | awk '/^RESULT/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["rps"], v["p50"], v["p99"], v["p999"], v["errors"] }'
}

median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

results="$OUT/results.txt"; : > "$results"
for workers in $WORKERS_LIST; do
  for backend in $BACKENDS; do
    bport=$([ $backend = fast ] && echo $FAST || echo $SLOW)
    start_balancer "$workers" 19101 "$bport"
    start_nginx "$workers" 19102 "$bport"
    start_haproxy "$workers" 19103 "$bport"
    for mode in $MODES; do
      for target in $TARGETS; do
        case $target in direct) port=$bport;; balancer) port=19101;; nginx) port=19102;; haproxy) port=19103;; esac
        runs="$OUT/runs.txt"; : > "$runs"
        for _ in $(seq "$REPEAT"); do run_wrk "http://127.0.0.1:$port/" "$mode" >> "$runs"; done
        rps=$(awk '{print $1}' "$runs" | median); p50=$(awk '{print $2}' "$runs" | median)
        p99=$(awk '{print $3}' "$runs" | median); p999=$(awk '{print $4}' "$runs" | median)
        errs=$(awk '{s += $5} END {print s + 0}' "$runs")
        echo "$workers $backend $mode $target $rps $p50 $p99 $p999 $errs" >> "$results"
        printf '  workers=%s %-4s %-9s %-8s %10.0f req/s  p50 %6.3f ms  p99 %6.3f ms  p99.9 %6.3f ms  errors %s\n' \
          "$workers" "$backend" "$mode" "$target" "$rps" "$p50" "$p99" "$p999" "$errs"
      done
    done
    # Backend connection reuse under the balancer runs: requests per connection opened.
    m=$(curl -s http://127.0.0.1:19199/metrics || true)
    opened=$(echo "$m" | awk '/^balancer_backend_connections_opened_total/ {s += $2} END {print s + 0}')
    served=$(echo "$m" | awk '/^balancer_requests_total/ {s += $2} END {print s + 0}')
    [ "$opened" -gt 0 ] && echo "  workers=$workers $backend: balancer served $served requests over $opened backend connections ($(awk -v s="$served" -v o="$opened" 'BEGIN {printf "%.1f%%", 100 * (1 - o / s)}') reuse)"
    stop "$BAL_PID"; stop "$NGINX_PID"; stop "$HAPROXY_PID"
  done
done

echo
echo "Medians of $REPEAT runs of $DURATION, $CONNS connections, wrk -t2 on the same machine ($(nproc) cores)."
echo "ratio/direct = req/s over direct-to-backend; ratio/nginx = req/s over nginx with the same workers."
printf '\n| workers | backend | mode | target | req/s | p50 ms | p99 ms | p99.9 ms | vs direct | vs nginx |\n|---|---|---|---|---|---|---|---|---|---|\n'
awk '{ key = $1 " " $2 " " $3; if ($4 == "direct") d[key] = $5; if ($4 == "nginx") n[key] = $5; row[NR] = $0 }
  END { for (i = 1; i <= NR; i++) { split(row[i], f, " "); key = f[1] " " f[2] " " f[3];
    rd = d[key] ? sprintf("%.2f", f[5] / d[key]) : "-"; rn = n[key] ? sprintf("%.2f", f[5] / n[key]) : "-"
    printf "| %s | %s | %s | %s | %.0f | %.3f | %.3f | %.3f | %s | %s |\n", f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], rd, rn } }' "$results"

# Memory: idle, under keep-alive load, and with many idle keep-alive clients.
[ "$IDLE_CONNS" -gt 0 ] || exit 0
start_balancer 2 19101 $FAST
sleep 0.5
idle=$(rss_kib "$BAL_PID")
( run_wrk "http://127.0.0.1:19101/" keepalive > /dev/null ) & wrk_pid=$!
peak=0
while kill -0 $wrk_pid 2>/dev/null; do r=$(rss_kib "$BAL_PID"); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.2; done
sleep 1
before=$(rss_kib "$BAL_PID")
python3 benches/load/idle_conns.py 127.0.0.1 19101 "$IDLE_CONNS" 10 > "$OUT/idle.txt" & py=$!
for _ in $(seq 200); do grep -q ready "$OUT/idle.txt" 2>/dev/null && break; sleep 0.1; done
just=$(rss_kib "$BAL_PID")
# Idle connections are parked after 500 ms; freed memory goes back to the system within 2 s.
sleep 4
held=$(rss_kib "$BAL_PID")
parked=$(curl -s http://127.0.0.1:19199/metrics | awk '/^balancer_client_connections_parked / {print $2}')
wait $py || true
per=$(( (held - before) * 1024 / IDLE_CONNS ))
echo
echo "balancer resident memory: idle ${idle} KiB, peak under keep-alive load ${peak} KiB,"
echo "  with $(awk '{print $2}' "$OUT/idle.txt") idle keep-alive clients ${held} KiB (${per} bytes per connection over ${before} KiB;"
echo "  ${parked:-?} of them parked; ${just} KiB the moment the last one was answered)"
