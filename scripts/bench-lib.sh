# Shared by the bench scripts (sourced, not run).

# load_with_server_cpu PID TARGET [breakwater-load arguments...]: runs
# breakwater-load against TARGET and sets cpu_seconds to the CPU time (user +
# system, /proc/PID/stat) the server process PID used meanwhile. breakwater-load
# watches PID as "breakwater" and every NAME=PID in the array watched_processes
# (backends), and prints each one's CPU-µs per acked event (its "cpu:" line).
watched_processes=()
load_with_server_cpu() {
  local pid=$1 target=$2 before watch=()
  shift 2
  for named in "${watched_processes[@]}"; do watch+=(--watch "$named"); done
  before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  ./target/release/breakwater-load --target "$target" --watch "breakwater=$pid" "${watch[@]}" "$@"
  cpu_seconds=$(awk -v before="$before" -v hz="$(getconf CLK_TCK)" \
    '{ printf "%.2f", ($14 + $15 - before) / hz }' "/proc/$pid/stat")
}
