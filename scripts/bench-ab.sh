#!/usr/bin/env bash
# Benchmark (not a test): two breakwater binaries under the same load, alternating
# A, B, A, B, A, B, each a fresh server on the embedded default in a temporary data
# directory on a loopback port. Prints, per run, the server's CPU time (user +
# system, from /proc/<pid>/stat) and the load generator's figures. At a fixed
# --rate both serve the same events, so CPU seconds compare the code's cost per
# event even when the machine is noisy; as fast as acks allow, compare events/s.
#   cargo build --release --bins && cp target/release/breakwater /tmp/bw-new
#   git stash && cargo build --release --bin breakwater && cp target/release/breakwater /tmp/bw-old && git stash pop
#   ./scripts/bench-ab.sh /tmp/bw-old /tmp/bw-new --connections 32 --batch-size 100 --duration-seconds 8 --rate 200000
# BENCH_ROUNDS (default 3) sets how many A/B pairs run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ] || [ ! -x "$1" ] || [ ! -x "$2" ]; then
  echo "usage: $0 BINARY_A BINARY_B [breakwater-load arguments...]" >&2
  exit 2
fi
binary_a=$1
binary_b=$2
shift 2
cargo build --release --locked --bin breakwater-load >&2
ticks_per_second=$(getconf CLK_TCK)

run() { # binary, load arguments...
  local binary=$1
  shift
  local dir port pid
  dir=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  printf '[server]\n' >"$dir/config.toml"
  "$binary" serve --listen "127.0.0.1:$port" --data-dir "$dir/data" --config "$dir/config.toml" >"$dir/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break
    sleep 0.1
  done
  local before after summary
  before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  summary=$(./target/release/breakwater-load --target "127.0.0.1:$port" "$@" 2>&1 >/dev/null | grep '^target' || true)
  after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  awk -v name="$binary" -v ticks=$((after - before)) -v hz="$ticks_per_second" -v summary="$summary" \
    'BEGIN { printf "%s: server CPU %.2f s; %s\n", name, ticks / hz, summary }'
}

for _ in $(seq 1 "${BENCH_ROUNDS:-3}"); do
  run "$binary_a" "$@"
  run "$binary_b" "$@"
done
