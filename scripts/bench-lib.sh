# Shared by the bench scripts (sourced, not run).

# load_with_server_cpu PID TARGET [breakwater-load arguments...]: runs
# breakwater-load against TARGET and sets cpu_seconds to the CPU time (user +
# system, /proc/PID/stat) the server process PID used meanwhile.
load_with_server_cpu() {
  local pid=$1 target=$2 before
  shift 2
  before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  ./target/release/breakwater-load --target "$target" "$@"
  cpu_seconds=$(awk -v before="$before" -v hz="$(getconf CLK_TCK)" \
    '{ printf "%.2f", ($14 + $15 - before) / hz }' "/proc/$pid/stat")
}
