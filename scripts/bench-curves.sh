#!/usr/bin/env bash
# Benchmark (not a test): the scaling curves of docs/performance.md. Each point is
# one ./scripts/bench.sh run (a fresh server on the embedded default, a fresh data
# dir) with --reference, so every point also has the loopback ceiling measured in
# the same run. Results: target/bench/curves.jsonl (one JSON report per point, with
# its "curve" and "label"), then docs/perf/*.svg and a Markdown table on stdout.
#   ./scripts/bench-curves.sh                 # every curve, 5 s per point
#   BENCH_SECONDS=10 ./scripts/bench-curves.sh batch connections
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${BENCH_SECONDS:-5}"
curves=("$@")
[ ${#curves[@]} -eq 0 ] && curves=(batch connections size transport sink)
out=target/bench/curves.jsonl
mkdir -p target/bench
: >"$out"
cargo build --release --locked --bins --features tools >&2

point() { # curve label load-arguments... (BENCH_SINK_DOWN=1 point ... for a sink down)
  local curve=$1 label=$2
  shift 2
  echo "== $curve $label" >&2
  ./scripts/bench.sh --reference --duration-seconds "$seconds" "$@" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["curve"]=sys.argv[1]; r["label"]=sys.argv[2]; print(json.dumps(r))' "$curve" "$label" >>"$out"
}

for curve in "${curves[@]}"; do
  case "$curve" in
    batch)
      for b in 1 10 100 1000; do point batch "$b" --connections 32 --batch-size "$b"; done ;;
    connections)
      for c in 1 4 16 64 256; do point connections "$c" --connections "$c" --batch-size 100; done ;;
    size)
      for s in 400 1600 6400; do point size "$s" --connections 32 --batch-size 50 --event-bytes "$s"; done ;;
    transport)
      for t in http ws; do point transport "$t" --connections 32 --batch-size 100 --transport "$t"; done ;;
    sink)
      point sink healthy --connections 32 --batch-size 100
      BENCH_SINK_DOWN=1 point sink "one sink down" --connections 32 --batch-size 100 ;;
    *) echo "unknown curve $curve (batch, connections, size, transport, sink)" >&2; exit 2 ;;
  esac
done
python3 scripts/plot_curves.py "$out" docs/perf
