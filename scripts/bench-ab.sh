#!/usr/bin/env bash
# Benchmark (not a test): two breakwater binaries under the same load, alternating
# A, B, A, B, A, B, each one ./scripts/bench.sh run (a fresh server on the embedded
# default) with BENCH_SERVER set to it. Prints, per run, the binary, the load
# generator's summary and the server line, which includes the server's CPU time.
# At a fixed --rate both serve the same events, so CPU seconds compare the code's
# cost per event even when the machine is noisy; as fast as acks allow, compare
# events/s.
#   cargo build --release --bins --features tools && cp target/release/breakwater /tmp/bw-new
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
for _ in $(seq 1 "${BENCH_ROUNDS:-3}"); do
  for binary in "$binary_a" "$binary_b"; do
    echo "== $binary"
    BENCH_SERVER="$binary" ./scripts/bench.sh "$@" 2>&1 >/dev/null | grep -E '^(target|server|cpu):? ' || true
  done
done
