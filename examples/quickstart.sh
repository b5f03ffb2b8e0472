#!/usr/bin/env bash
# Brings up two demo backends and balancer in front of them: curl localhost:8080/
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin balancer --example demo_backend
target/release/examples/demo_backend --port 8000 --port 8001 &
demo=$!
trap 'kill $demo 2>/dev/null || true' EXIT
exec_status=0
target/release/balancer -c balancer.toml "$@" || exec_status=$?
exit $exec_status
