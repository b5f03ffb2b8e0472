#!/usr/bin/env bash
# TLS handshakes, full and resumed, balancer against nginx (one worker each) on the same
# certificate: `openssl s_time` opens connections as fast as it can for DURATION, either
# each with a new session (-new) or each resuming the session of the first (-reuse, a
# returning client). For each row: connections per second, how
# many of them resumed, and the server's CPU time (user + system, from /proc) per
# connection. nginx keeps a shared session cache and session tickets, as sites run it.
#
#   benches/tls_resumption.sh
#   DURATION=10 benches/tls_resumption.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/nginx_conf.sh
DURATION=${DURATION:-5}
OUT=${OUT:-target/tls_resumption}
mkdir -p "$OUT"
. benches/install.sh
install_missing nginx openssl
cargo build --release -q --bin balancer --example demo_backend

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null

target/release/examples/demo_backend --port 19401 >/dev/null & pids+=($!)
cat > "$OUT/balancer.toml" <<CFG
[server]
listen = "127.0.0.1:19402"
workers = 1
[server.tls]
listen = ["127.0.0.1:19403"]
cert = "$PWD/$OUT/cert.pem"
key = "$PWD/$OUT/key.pem"
[log]
access = false
[upstreams.app]
backends = ["http://127.0.0.1:19401"]
CFG
target/release/balancer -c "$OUT/balancer.toml" >/dev/null 2>&1 & pids+=($!); bal=$!
nginx_conf "$PWD/$OUT/nginx" 1 19404 19401 "daemon off;" "
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  ssl_session_tickets on;
  server {
    listen 127.0.0.1:19405 ssl;
    ssl_certificate $PWD/$OUT/cert.pem;
    ssl_certificate_key $PWD/$OUT/key.pem;
    location / { proxy_pass http://app; }
  }"
nginx -c "$PWD/$OUT/nginx/nginx.conf" -p "$PWD/$OUT/nginx" 2>/dev/null & pids+=($!)
sleep 1
# nginx's worker is the process that serves (its master only forks it).
ngx=$(pgrep -f "nginx: worker process" -n)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

run() { # name pid port version mode
  local name=$1 pid=$2 port=$3 version=$4 mode=$5 before after out
  before=$(cpu_ticks "$pid")
  out=$(openssl s_time -connect "127.0.0.1:$port" "-$mode" "-$version" -time "$DURATION" 2>&1 || true)
  after=$(cpu_ticks "$pid")
  # "N connections in S real seconds"; with -reuse, one character per connection:
  # r resumed, * a new session.
  awk -v name="$name" -v version="$version" -v mode="$mode" -v cpu=$((after - before)) -v hz="$hz" '
    /^[*r]+$/ { resumed += gsub("r", "") }
    /connections in .* real seconds/ { conns = $1; secs = $4 }
    END {
      if (conns == 0) { printf "%-9s %-7s %-6s failed\n", name, version, mode; exit }
      printf "%-9s %-7s %-6s %7.0f conn/s  %6d of %6d resumed  %5.0f µs CPU per connection\n",
        name, version, mode, conns / secs, resumed, conns, cpu * 1000000 / hz / conns
    }' <<<"$out"
}

# No TLS 1.3 -reuse row: s_time closes each connection before the server's tickets (sent
# after a TLS 1.3 handshake) arrive, so it never has a session to resume, with any server.
# tests/tls.rs checks that TLS 1.3 clients resume.
for row in "tls1_2 new" "tls1_2 reuse" "tls1_3 new"; do
  set -- $row
  run balancer "$bal" 19403 "$1" "$2"
  run nginx "$ngx" 19405 "$1" "$2"
done
