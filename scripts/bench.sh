#!/usr/bin/env bash
# Benchmark (not a test): builds release binaries, starts breakwater on its embedded
# default in a temporary data dir on a loopback port, drives it with breakwater-load,
# prints the load report (JSON on stdout, one-line summary on stderr), then stops
# the server and removes the data. Extra arguments go to breakwater-load, e.g.
#   ./scripts/bench.sh --connections 32 --batch-size 100 --duration-seconds 10
# BENCH_SINK_DOWN=1 adds a ClickHouse sink that is down (nothing listens on its
# port): every event is then written to the file sink and to ClickHouse's spool.
# BENCH_CONFIG=path uses that config file instead of none (the embedded default).
# BENCH_SERVER=path serves with that breakwater binary instead of this build's
# (scripts/bench-ab.sh compares two builds this way). The server line on stderr
# includes the server's CPU time during the load (user + system, /proc/<pid>/stat).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh

port="${BENCH_PORT:-18631}"
cargo build --release --locked --bins --features tools >&2
data_dir="$(mktemp -d)"
config="${BENCH_CONFIG:-/dev/null}"  # BENCH_CONFIG=path: a config file of your own
if [ "${BENCH_SINK_DOWN:-0}" = 1 ]; then
  config="$data_dir/breakwater.toml"
  printf '[file_sink]\nenabled = true\n[clickhouse]\nurl = "http://127.0.0.1:9"\n' >"$config"
fi
"${BENCH_SERVER:-./target/release/breakwater}" serve --listen "127.0.0.1:${port}" --data-dir "$data_dir" --config "$config" \
  >"$data_dir/server.log" 2>&1 &
server_pid=$!
cleanup() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  rm -rf "$data_dir"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:${port}/health/ready" >/dev/null 2>&1 && break
  sleep 0.1
done

load_with_server_cpu "$server_pid" "127.0.0.1:${port}" "$@"
echo "server: CPU ${cpu_seconds} s during the load; $(curl -s "http://127.0.0.1:${port}/metrics" | awk '
  /^breakwater_file_sink_requests_per_fsync_sum/ {r=$2}
  /^breakwater_file_sink_requests_per_fsync_count/ {n=$2}
  /^breakwater_file_sink_fsync_duration_seconds_sum/ {s=$2}
  /^breakwater_spool_appended_events_total/ {sp+=$2}
  /^breakwater_spool_bytes\{/ {sb+=$2}
  END { if (n > 0) printf "%d fsyncs, %.1f requests per fsync, mean fsync %.2f ms, %d events spooled", n, r/n, 1000*s/n, sp;
        if (sp > 0) printf " (spool holds %.1f MB, %.0f bytes per event)", sb/1e6, sb/sp }'); peak RSS $(awk '/VmHWM/ {print $2, $3}' /proc/$server_pid/status)" >&2
