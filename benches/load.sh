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
#   FEATURES="" benches/load.sh     # without the feature rows (see the end of this file)
#   WORKERS_LIST="" IDLE_CONNS=0 FEATURES="h2c h2-tls" benches/load.sh   # two feature rows only
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/nginx_conf.sh
DURATION=${DURATION:-5s}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-50}
IDLE_CONNS=${IDLE_CONNS:-10000}
WORKERS_LIST=${WORKERS_LIST-"1 2"}
BACKENDS=${BACKENDS:-"fast slow"}
MODES=${MODES:-"keepalive close"}
TARGETS=${TARGETS:-"direct balancer nginx haproxy"}
ACCESS_LOG=${ACCESS_LOG:-off}
FEATURES=${FEATURES-"plain max_inflight least-latency consistent-hash tls tls-close h2c h2-tls active-10k"}
FEATURE_WORKERS=${FEATURE_WORKERS:-"1 2"}
ACTIVE_DURATION=${ACTIVE_DURATION:-15s}   # active-10k: wrk takes seconds to open 10,000 connections
OUT=${OUT:-target/load}
mkdir -p "$OUT"

. benches/install.sh
install_missing wrk nginx haproxy
[ -z "$FEATURES" ] || install_missing h2load openssl
cargo build --release -q --bin balancer --example demo_backend
# BAL=path runs another build of balancer (an A/B against an older commit's binary).
BAL=${BAL:-target/release/balancer}
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

# BAL_TLS (a [server.tls] table), BAL_BACKENDS (the backends list) and BAL_UPSTREAM (more
# keys and tables of the upstream) change the config, for the feature rows.
start_balancer() { # workers port backend_port
  cat > "$OUT/balancer.toml" <<CFG
[server]
listen = "127.0.0.1:$2"
workers = $1
max_connections = 20000
${BAL_TLS:-}
[admin]
listen = "127.0.0.1:19199"
[log]
access = $([ "$ACCESS_LOG" = on ] && echo true || echo false)
[upstreams.app]
backends = [${BAL_BACKENDS:-"\"http://127.0.0.1:$3\""}]
keepalive = 256
${BAL_UPSTREAM:-}
CFG
  "$BAL" -c "$OUT/balancer.toml" 2>"$OUT/balancer.log" & pids+=($!); BAL_PID=$!
  wait_port "$2"
}

# NGINX_SERVER (more in its server block) and NGINX_UPSTREAM (the upstream's body), for the
# feature rows.
start_nginx() { # workers port backend_port
  local log=""
  [ "$ACCESS_LOG" = on ] && log="access_log $PWD/$OUT/nginx/access.log combined buffer=64k;"
  nginx_conf "$PWD/$OUT/nginx" "$1" "$2" "$3" "" "" "$log" "${NGINX_SERVER:-}" "${NGINX_UPSTREAM:-}"
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

run_wrk() { # url mode -> "rps p50 p99 p999 errors requests"
  local extra=()
  [ "$2" = close ] && extra=(-H "Connection: close")
  [ -n "${WRK_TIMEOUT:-}" ] && extra+=(--timeout "$WRK_TIMEOUT")
  wrk -t2 -c"$CONNS" -d"$DURATION" -s benches/load/report.lua "${extra[@]}" "$1" 2>/dev/null | awk '/^RESULT/ {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["rps"], v["p50"], v["p99"], v["p999"], v["errors"], v["requests"] }'
}

# CPU time of a proxy so far, in clock ticks: "user system", over the process and its
# children (nginx's workers; balancer's and HAProxy's threads are in the process's own).
cpu_ticks() { # pid -> "user system"
  local p
  for p in "$1" $(pgrep -P "$1" || true); do cat "/proc/$p/stat"; done |
    awk '{ sub(/^.*\) /, ""); u += $12; s += $13 } END { print u + 0, s + 0 }'
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

run_h2load() { # url -> "rps p50 p99 p999 errors"
  local log="$OUT/h2load.log" out
  out=$(h2load -t2 -c64 -m10 -D "$DURATION" --warm-up-time 1s --log-file "$log" "$1" 2>&1 || true)
  # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout";
  # "finished in 5.00s, N req/s, ...". The log: start time, status, microseconds taken.
  local failed rps
  failed=$(awk '/^requests:/ {print $10}' <<<"$out")
  rps=$(awk '/^finished in/ {print $4}' <<<"$out")
  sort -n -k3 "$log" | awk -v rps="${rps:-0}" -v failed="${failed:-0}" '{ d[NR] = $3 }
    function q(f) { i = int(NR * f); return d[i < 1 ? 1 : i] / 1000 }
    END { printf "%s %.3f %.3f %.3f %d\n", rps, q(0.5), q(0.99), q(0.999), failed }'
}

median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
# A runs file's medians of req/s, p50, p99 and p99.9, and its errors summed.
summary() { # runs_file -> "rps p50 p99 p999 errors"
  local c out=()
  for c in 1 2 3 4; do out+=("$(awk -v c="$c" '{print $c}' "$1" | median)"); done
  echo "${out[*]} $(awk '{s += $5} END {print s + 0}' "$1")"
}

results="$OUT/results.txt"; : > "$results"
for workers in $WORKERS_LIST; do
  for backend in $BACKENDS; do
    bport=$([ $backend = fast ] && echo $FAST || echo $SLOW)
    start_balancer "$workers" 19101 "$bport"
    start_nginx "$workers" 19102 "$bport"
    start_haproxy "$workers" 19103 "$bport"
    for mode in $MODES; do
      for target in $TARGETS; do
        case $target in
          direct) port=$bport; pid="";; balancer) port=19101; pid=$BAL_PID;;
          nginx) port=19102; pid=$NGINX_PID;; haproxy) port=19103; pid=$HAPROXY_PID;;
        esac
        runs="$OUT/runs.txt"; : > "$runs"
        [ -n "$pid" ] && read -r u0 s0 <<<"$(cpu_ticks "$pid")"
        for _ in $(seq "$REPEAT"); do run_wrk "http://127.0.0.1:$port/" "$mode" >> "$runs"; done
        read -r rps p50 p99 p999 errs <<<"$(summary "$runs")"
        # Proxy CPU per request: its user and system time over every request of the runs.
        cpu="- -"
        if [ -n "$pid" ]; then
          read -r u1 s1 <<<"$(cpu_ticks "$pid")"
          cpu=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$TICK_US" '{ n += $6 }
            END { if (n > 0) printf "%.2f %.2f", u * t / n, s * t / n; else print "- -" }' "$runs")
        fi
        echo "$workers $backend $mode $target $rps $p50 $p99 $p999 $errs $cpu" >> "$results"
        printf '  workers=%s %-4s %-9s %-8s %10.0f req/s  p50 %6.3f ms  p99 %6.3f ms  p99.9 %6.3f ms  errors %s  CPU µs/req user %s sys %s\n' \
          "$workers" "$backend" "$mode" "$target" "$rps" "$p50" "$p99" "$p999" "$errs" ${cpu}
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
echo "user, sys: the proxy's CPU time per request (µs, all runs, $(getconf CLK_TCK) ticks a second); CPU/nginx: user + sys over nginx's."
printf '\n| workers | backend | mode | target | req/s | p50 ms | p99 ms | p99.9 ms | vs direct | vs nginx | user | sys | CPU/nginx |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n'
awk '{ key = $1 " " $2 " " $3; if ($4 == "direct") d[key] = $5; if ($4 == "nginx") { n[key] = $5; c[key] = $10 + $11 }; row[NR] = $0 }
  END { for (i = 1; i <= NR; i++) { split(row[i], f, " "); key = f[1] " " f[2] " " f[3];
    rd = d[key] ? sprintf("%.2f", f[5] / d[key]) : "-"; rn = n[key] ? sprintf("%.2f", f[5] / n[key]) : "-"
    rc = (c[key] && f[10] != "-") ? sprintf("%.2f", (f[10] + f[11]) / c[key]) : "-"
    printf "| %s | %s | %s | %s | %.0f | %.3f | %.3f | %.3f | %s | %s | %s | %s | %s |\n", f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], rd, rn, f[10], f[11], rc } }' "$results"

# Feature rows: TLS and HTTP/2 clients, 10,000 active clients, and what each of this wave's
# features costs when it is configured, balancer beside nginx doing the same job (where
# nginx has one) and beside balancer's own `plain` row of the same run:
#   plain            one backend, HTTP/1.1 keep-alive (the reference for the rows below)
#   max_inflight     a cap of 1,000 per backend and a queue, nobody waiting (nginx: max_conns)
#   least-latency    1,000 backends (nginx: `random two least_conn`, its nearest)
#   consistent-hash  1,000 backends by client IP (nginx: `hash $remote_addr consistent`);
#                    every wrk connection is from 127.0.0.1, so one backend takes all of it
#   tls, tls-close   HTTP/1.1 over TLS 1.3, keep-alive and a handshake per request
#   h2c, h2-tls      h2load, 64 connections x 10 streams, prior knowledge and over TLS (ALPN)
#   active-10k       10,000 keep-alive connections all sending (wrk gives up on a request
#                    after 10 s, not 2 s, so that the slowest count in the percentiles)
if [ -n "$FEATURES" ] && [ -n "$FEATURE_WORKERS" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
  MANY=1000; MANY_BASE=20000; many_list=""; many_nginx=""; many_ports=()
  for i in $(seq 0 $((MANY - 1))); do
    many_ports+=(--port $((MANY_BASE + i)))
    many_list+="${many_list:+, }\"http://127.0.0.1:$((MANY_BASE + i))\""
    many_nginx+="server 127.0.0.1:$((MANY_BASE + i)); "
  done
  if [[ " $FEATURES " == *" least-latency "* || " $FEATURES " == *" consistent-hash "* ]]; then
    "$DEMO" "${many_ports[@]}" >/dev/null & pids+=($!)
    wait_port $((MANY_BASE + MANY - 1))
  fi
  BAL_TLS="[server.tls]
listen = [\"127.0.0.1:19107\"]
cert = \"$PWD/$OUT/cert.pem\"
key = \"$PWD/$OUT/key.pem\""
  # One server block: plain HTTP/1.1 on 19102, h2c on 19104, TLS (h2 and http/1.1) on 19105.
  NGINX_SERVER="listen 127.0.0.1:19104 http2; listen 127.0.0.1:19105 ssl http2;
    ssl_certificate $PWD/$OUT/cert.pem; ssl_certificate_key $PWD/$OUT/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;"

  fresults="$OUT/features.txt"; : > "$fresults"
  for workers in $FEATURE_WORKERS; do
    for feature in $FEATURES; do
      BAL_BACKENDS=""; BAL_UPSTREAM=""; NGINX_UPSTREAM=""; conns=$CONNS; duration=$DURATION; timeout=""; client=wrk; scheme=http
      bal_port=19101; ngx_port=19102; mode=keepalive
      case $feature in
        plain) ;;
        max_inflight)
          BAL_UPSTREAM=$'max_inflight = 1000\n[upstreams.app.queue]\nmax = 100'
          NGINX_UPSTREAM="server 127.0.0.1:$FAST max_conns=1000; keepalive 256;" ;;
        least-latency)
          BAL_BACKENDS=$many_list; BAL_UPSTREAM='strategy = "least-latency"'
          NGINX_UPSTREAM="random two least_conn; $many_nginx keepalive 1024;" ;;
        consistent-hash)
          BAL_BACKENDS=$many_list; BAL_UPSTREAM='strategy = "consistent-hash"'
          NGINX_UPSTREAM="hash \$remote_addr consistent; $many_nginx keepalive 1024;" ;;
        tls) scheme=https; bal_port=19107; ngx_port=19105 ;;
        tls-close) scheme=https; bal_port=19107; ngx_port=19105; mode=close ;;
        h2c) client=h2load; ngx_port=19104 ;;
        h2-tls) client=h2load; scheme=https; bal_port=19107; ngx_port=19105 ;;
        active-10k) conns=10000; duration=$ACTIVE_DURATION; timeout=10s ;;
        *) echo "unknown feature row $feature" >&2; exit 2 ;;
      esac
      start_balancer "$workers" 19101 $FAST
      start_nginx "$workers" 19102 $FAST
      for target in balancer nginx; do
        port=$([ $target = balancer ] && echo $bal_port || echo $ngx_port)
        runs="$OUT/runs.txt"; : > "$runs"
        for _ in $(seq "$REPEAT"); do
          if [ $client = h2load ]; then run_h2load "$scheme://127.0.0.1:$port/" >> "$runs"
          else CONNS=$conns DURATION=$duration WRK_TIMEOUT=$timeout run_wrk "$scheme://127.0.0.1:$port/" "$mode" >> "$runs"; fi
        done
        read -r rps p50 p99 p999 errs <<<"$(summary "$runs")"
        echo "$workers $feature $target $rps $p50 $p99 $p999 $errs" >> "$fresults"
        printf '  workers=%s %-16s %-8s %10.0f req/s  p50 %6.3f ms  p99 %6.3f ms  p99.9 %6.3f ms  errors %s\n' \
          "$workers" "$feature" "$target" "$rps" "$p50" "$p99" "$p999" "$errs"
      done
      stop "$BAL_PID"; stop "$NGINX_PID"
    done
  done
  BAL_TLS=""; BAL_BACKENDS=""; BAL_UPSTREAM=""; NGINX_SERVER=""; NGINX_UPSTREAM=""
  echo
  echo "Feature rows: medians of $REPEAT runs of $DURATION; wrk -t2 with $CONNS connections (10,000 for"
  echo "active-10k, runs of $ACTIVE_DURATION), h2load -t2 -c64 -m10. vs plain: req/s over balancer's plain row with the same workers."
  printf '\n| workers | row | target | req/s | p50 ms | p99 ms | p99.9 ms | vs plain | vs nginx |\n|---|---|---|---|---|---|---|---|---|\n'
  awk '{ if ($3 == "nginx") n[$1 " " $2] = $4; if ($2 == "plain" && $3 == "balancer") b[$1] = $4; row[NR] = $0 }
    END { for (i = 1; i <= NR; i++) { split(row[i], f, " ")
      rp = (f[3] == "balancer" && b[f[1]]) ? sprintf("%.2f", f[4] / b[f[1]]) : "-"
      rn = n[f[1] " " f[2]] ? sprintf("%.2f", f[4] / n[f[1] " " f[2]]) : "-"
      printf "| %s | %s | %s | %.0f | %.3f | %.3f | %.3f | %s | %s |\n", f[1], f[2], f[3], f[4], f[5], f[6], f[7], rp, rn } }' "$fresults"
fi

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
