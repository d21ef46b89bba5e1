# Shared by the bench scripts (sourced, not run).

# load_with_server_cpu PID TARGET [breakwater-load arguments...]: runs
# breakwater-load against TARGET, passing its JSON report through to stdout, and
# sets cpu_seconds to the CPU time the server process PID used during the measured
# run, as the report gives it. breakwater-load watches PID as "breakwater" and every
# NAME=PID in the array watched_processes (backends), and prints each one's CPU-µs
# per acked event (its "cpu:" line).
watched_processes=()
load_with_server_cpu() {
  local pid=$1 target=$2 watch=() report
  shift 2
  for named in "${watched_processes[@]}"; do watch+=(--watch "$named"); done
  report=$(mktemp)
  ./target/release/breakwater-load --target "$target" --watch "breakwater=$pid" "${watch[@]}" "$@" >"$report"
  cat "$report"
  cpu_seconds=$(python3 -c 'import json, sys; print("%.2f" % json.load(open(sys.argv[1]))["cpu"]["breakwater"]["cpu_seconds"])' "$report")
  rm -f "$report"
}
