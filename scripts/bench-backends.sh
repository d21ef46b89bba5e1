#!/usr/bin/env bash
# Benchmark (not a test): breakwater with Redis dedup + ClickHouse + Kafka (tansu),
# all started here on free loopback ports in a temporary directory, driven by
# breakwater-load; everything is stopped and deleted at the end. Arguments go to
# breakwater-load, e.g.
#   ./scripts/bench-backends.sh --connections 32 --batch-size 100 --duration-seconds 10
# Needs redis-server, clickhouse-server and tansu (./scripts/test.sh installs them).
# BENCH_DOWN=clickhouse (or kafka) points that sink at a closed port, as if its
# backend were down: its copy of every event then goes to its spool.
# BENCH_POLICY=path runs with that policy file instead of the embedded default.
# BENCH_CLICKHOUSE_ACKNOWLEDGE=on_spool acknowledges ClickHouse's copy once it is
# spooled (delivered behind the ack); the run then also waits, up to 5 minutes, for
# that spool to drain and reports how long the drain took after the load ended.
# BENCH_SERVER=path serves with that breakwater binary instead of this build's (to
# compare two builds); the last line includes the server's CPU time during the load.
# BENCH_INSTANCES=N (default 1) runs N breakwater instances, each with its own data
# directory and port, sharing Redis, ClickHouse and Kafka; the load generator spreads
# its connections over them round robin (--resend-percent then resends through the
# other instance). The "cpu:" line gives each process's CPU-µs per acked event.
# After the load, the exactly-once oracle (breakwater-count) compares ClickHouse's
# raw rows (merges are stopped for the run) and Kafka's records with their distinct
# events and with the acked events; the "oracle:" line says whether they agree.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 1 300); do if eval "$1" >/dev/null 2>&1; then return 0; fi; sleep 0.1; done; echo "timed out: $1" >&2; exit 1; }

cargo build --release --locked --bins --features tools >&2
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

redis_port=$(free_port); ch_port=$(free_port); kafka_port=$(free_port); bw_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null 2>&1 &
pids+=($!)
watched_processes+=("redis=$!")
mkdir -p "$work"/ch/{data,tmp,uf,fs}
clickhouse-server --config-file=/etc/clickhouse-server/config.xml -- --path="$work/ch/data/" \
  --tmp_path="$work/ch/tmp/" --user_files_path="$work/ch/uf/" --format_schema_path="$work/ch/fs/" \
  --logger.log="$work/ch/log" --logger.errorlog="$work/ch/err" --http_port="$ch_port" \
  --tcp_port="$(free_port)" --interserver_http_port="$(free_port)" >/dev/null 2>&1 &
pids+=($!)
watched_processes+=("clickhouse=$!")
(cd "$work" && exec tansu broker --listener-url "tcp://127.0.0.1:$kafka_port" \
  --advertised-listener-url "tcp://127.0.0.1:$kafka_port" --storage-engine memory://tansu/ >/dev/null 2>&1) &
pids+=($!)
watched_processes+=("tansu=$!")
wait_for "redis-cli -p $redis_port ping"
wait_for "curl -sf http://127.0.0.1:$ch_port/?query=SELECT%201"
wait_for "tansu topic create events --broker tcp://127.0.0.1:$kafka_port --partitions 3"

clickhouse_url="http://127.0.0.1:$ch_port"
kafka_brokers="127.0.0.1:$kafka_port"
ready="/health/ready"
case "${BENCH_DOWN:-}" in
  "") ;;
  clickhouse) clickhouse_url="http://127.0.0.1:9"; ready="/health/live" ;;
  kafka) kafka_brokers="127.0.0.1:9"; ready="/health/live" ;;
  *) echo "BENCH_DOWN must be clickhouse or kafka, not '$BENCH_DOWN'" >&2; exit 2 ;;
esac
cat > "$work/breakwater.toml" <<TOML
[redis]
url = "redis://127.0.0.1:$redis_port"
[clickhouse]
url = "$clickhouse_url"
acknowledge = "${BENCH_CLICKHOUSE_ACKNOWLEDGE:-on_delivery}"
[kafka]
brokers = "$kafka_brokers"
topic = "events"
TOML
targets=()
for instance in $(seq 1 "${BENCH_INSTANCES:-1}"); do
  port=$bw_port
  [ "$instance" = 1 ] || port=$(free_port)
  "${BENCH_SERVER:-./target/release/breakwater}" serve --config "$work/breakwater.toml" --listen "127.0.0.1:$port" \
    ${BENCH_POLICY:+--policy "$BENCH_POLICY"} --data-dir "$work/data-$instance" >"$work/server-$instance.log" 2>&1 &
  pids+=($!)
  if [ "$instance" = 1 ]; then server_pid=$!; else watched_processes+=("breakwater_$instance=$!"); fi
  wait_for "curl -sf http://127.0.0.1:$port$ready"
  targets+=("127.0.0.1:$port")
done
# Raw rows for the oracle: a ReplacingMergeTree merge would fold a duplicate away.
[ -n "${BENCH_DOWN:-}" ] || curl -sf "http://127.0.0.1:$ch_port/" --data-binary "SYSTEM STOP MERGES breakwater.events" >/dev/null

load_with_server_cpu "$server_pid" "$(IFS=,; echo "${targets[*]}")" "$@" >"$work/load.json"
cat "$work/load.json"
if [ "${BENCH_CLICKHOUSE_ACKNOWLEDGE:-}" = on_spool ] && [ -z "${BENCH_DOWN:-}" ]; then
  load_ended=$(date +%s.%N)
  spool_events() {
    for target in "${targets[@]}"; do curl -s "http://$target/metrics"; done |
      awk '/^breakwater_spool_events\{sink="clickhouse"\}/ {n += $2} END {print n + 0}'
  }
  for _ in $(seq 1 3000); do [ "$(spool_events)" = 0 ] && break; sleep 0.1; done
  awk -v s="$load_ended" -v e="$(date +%s.%N)" -v left="$(spool_events)" \
    'BEGIN { printf "server: clickhouse spool drained %.1f s after the load ended (%s events left)\n", e - s, left }' >&2
fi
curl -s "http://127.0.0.1:$bw_port/metrics" | grep -E "(delivery_duration_seconds|http_request_duration_seconds|insert_duration_seconds)_bucket.*le=\"(0.5|1|2.5|\+Inf)\"" >&2
rows=$(curl -s "http://127.0.0.1:$ch_port/?query=SELECT%20count()%20FROM%20breakwater.events")
inserts=$(curl -s "http://127.0.0.1:$bw_port/metrics" | awk '/^breakwater_clickhouse_events_per_insert_count/ {print $2}')
claims=$(curl -s "http://127.0.0.1:$bw_port/metrics" | awk '/^breakwater_redis_round_trips_total\{operation="claim"\}/ {print $2}')
curl -s "http://127.0.0.1:$bw_port/metrics" | awk '
  /^breakwater_sink_delivery_duration_seconds_sum/ { match($0, /sink="[a-z]+"/); s[substr($0, RSTART+6, RLENGTH-7)] = $2 }
  /^breakwater_sink_delivery_duration_seconds_count/ { match($0, /sink="[a-z]+"/); n[substr($0, RSTART+6, RLENGTH-7)] = $2 }
  /^breakwater_clickhouse_insert_duration_seconds_sum/ { ins = $2 } /^breakwater_clickhouse_insert_duration_seconds_count/ { insn = $2 }
  END { for (k in s) printf "server: mean delivery wait %s %.1f ms\n", k, 1000*s[k]/n[k]; if (insn) printf "server: mean clickhouse INSERT %.1f ms\n", 1000*ins/insn }' >&2
spooled=$(curl -s "http://127.0.0.1:$bw_port/metrics" | awk '/^breakwater_spool_events\{/ {match($0, /sink="[a-z_]+"/); printf "%s %s; ", substr($0, RSTART+6, RLENGTH-7), $2}')
echo "server: spooled now: ${spooled:-none}" >&2
redis-cli -p "$redis_port" info commandstats | grep -E "^cmdstat_(eval|set|evalsha)" | sed 's/^/redis: /' >&2
if [ -z "${BENCH_DOWN:-}" ]; then
  ./target/release/breakwater-count --clickhouse "http://127.0.0.1:$ch_port" --kafka "$kafka_brokers" --topic events \
    >"$work/count.json"
  cp "$work/count.json" target/bench/count-last.json 2>/dev/null || true
  python3 - "$work/load.json" "$work/count.json" >&2 <<'PY' || oracle_failed=1
import json, sys
load, count = (json.load(open(path)) for path in sys.argv[1:3])
acked = load["acked_events"]
unanswered = sum(load["non_200"].values()) * load["batch_size"] + load["connection_errors"] * load["batch_size"]
verdicts = []
for sink, raw_key, twice_key in (("clickhouse", "raw_rows", "events_in_more_than_one_row"),
                                 ("kafka", "records", "events_more_than_once")):
    c = count[sink]
    # Every acked event there once; events of refused or unanswered requests may be.
    ok = c[twice_key] == 0 and c[raw_key] == c["distinct_events"] and acked <= c["distinct_events"] <= acked + unanswered
    verdicts.append(ok)
    print(f"oracle: {sink}: {c[raw_key]} raw, {c['distinct_events']} distinct, {c[twice_key]} more than once; "
          f"acked {acked} (+{unanswered} in refused or unanswered requests) -> {'exactly once' if ok else 'NOT EXACTLY ONCE'}")
sys.exit(0 if all(verdicts) else 1)
PY
fi
oracle_failed=${oracle_failed:-0}
echo "server: clickhouse rows $rows in $inserts INSERTs; redis claim round trips $claims; CPU ${cpu_seconds} s during the load; peak RSS $(awk '/VmHWM/ {print $2, $3}' /proc/$server_pid/status)" >&2
if [ "$oracle_failed" = 1 ]; then
  mkdir -p target/bench && cp "$work"/server-*.log target/bench/
  echo "oracle: an acked event is missing or an event was written twice (above); server logs in target/bench/" >&2
  exit 1
fi
