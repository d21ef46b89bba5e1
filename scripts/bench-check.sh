#!/usr/bin/env bash
# Before a merge: a short benchmark (HTTP and WebSocket, 32 connections x 100 events,
# embedded default, three 5 s runs each, each with the reference server in the same
# run; the median run counts, as single runs on a shared machine vary by a quarter),
# compared as ratios with the last published figures in docs/perf/baseline.json.
# The comparison that travels between machines is the share of the reference
# server; raw events/s only compare on the same machine. Exits 1 if a share falls
# below BENCH_TOLERANCE (default 0.8: medians of 5 s runs still vary by ±15 % on the
# 2-core machine) of the baseline's. The server's CPU-µs per acked event is printed
# beside it (not judged: at full speed it moves with how busy the cores are).
#   ./scripts/bench-check.sh
#   ./scripts/bench-check.sh --update    # make this run the new baseline
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p target/bench
for transport in http ws; do
  for run in 1 2 3; do
    ./scripts/bench.sh --reference --duration-seconds "${BENCH_SECONDS:-5}" --connections 32 --batch-size 100 \
      --transport "$transport" >"target/bench/check-$transport-$run.json"
  done
done
python3 - "$@" <<'PY'
import json, os, sys
from datetime import date
baseline_path = "docs/perf/baseline.json"
tolerance = float(os.environ.get("BENCH_TOLERANCE", "0.8"))
def median_run(transport):
    runs = [json.load(open(f"target/bench/check-{transport}-{n}.json")) for n in (1, 2, 3)]
    return sorted(runs, key=lambda r: r["fraction_of_reference"])[1]
def cpu_per_event(run):
    return run.get("cpu", {}).get("breakwater", {}).get("cpu_us_per_acked_event")
now = {t: median_run(t) for t in ("http", "ws")}
if "--update" in sys.argv[1:]:
    baseline = {"date": date.today().isoformat(), "points": {
        t: {"acked_events_per_second": r["acked_events_per_second"],
            "p99_ms": r["latency_ms"]["p99"],
            "fraction_of_reference": r["fraction_of_reference"],
            "server_cpu_us_per_event": cpu_per_event(r)} for t, r in now.items()}}
    json.dump(baseline, open(baseline_path, "w"), indent=2)
    print(f"baseline updated: {baseline_path}")
    sys.exit(0)
baseline = json.load(open(baseline_path))
failed = False
print(f"against the baseline of {baseline['date']} (tolerance {tolerance:.0%} of its share of the reference):")
for transport, result in now.items():
    base = baseline["points"][transport]
    share, base_share = result["fraction_of_reference"], base["fraction_of_reference"]
    ratio = share / base_share
    verdict = "ok" if ratio >= tolerance else "REGRESSION"
    failed |= ratio < tolerance
    print(f"  {transport}: {result['acked_events_per_second']:,.0f} events/s "
          f"({result['acked_events_per_second'] / base['acked_events_per_second']:.2f}x the baseline's), "
          f"p99 {result['latency_ms']['p99']:.1f} ms ({result['latency_ms']['p99'] / base['p99_ms']:.2f}x), "
          f"share of the reference {share:.1%} vs {base_share:.1%} = {ratio:.2f}x -> {verdict}")
    cpu, base_cpu = cpu_per_event(result), base.get("server_cpu_us_per_event")
    if cpu is not None and base_cpu:
        print(f"      server CPU {cpu:.2f} µs per acked event vs {base_cpu:.2f} ({cpu / base_cpu:.2f}x; informational)")
sys.exit(1 if failed else 0)
PY
