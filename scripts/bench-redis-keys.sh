#!/usr/bin/env bash
# Benchmark (not a test): what Redis spends per message id on dedup claims, for
# breakwater's key scheme and for a candidate. Each scheme runs against a fresh
# redis-server on a free loopback port, driven by redis-benchmark (EVAL of a claim
# over 100 new random ids per call, 8 connections); reports Redis's own CPU
# (INFO cpu, user + system) and memory (INFO memory) per id, then stops it.
#   ./scripts/bench-redis-keys.sh              # 20,000 calls = 2 M ids per scheme
#   BENCH_CALLS=5000 ./scripts/bench-redis-keys.sh
# Schemes:
#   per-id keys      breakwater's claim script as it is (read from src/dedup/redis.rs):
#                    one `SET key token NX GET EX ttl` per id
#   bucket hashes    a field per id in a hash per source and TTL-long time bucket
#                    (Redis's clock), the current and the previous bucket checked, one
#                    EXPIREAT per call; optionally also reading the per-id keys (an
#                    upgrade within the TTL must not forget ids); and the same with
#                    each step one command for all of a call's ids (HMGET, HMGET,
#                    MGET of the per-id keys, one HSET)
# Each is run twice: on an empty Redis, and after 1 M other ids were stored (steady
# state: the lookups then miss caches as they do in production).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null ||
  { echo "needs redis-server and redis-benchmark (apt install redis-server; ./scripts/test.sh installs it)" >&2; exit 1; }

calls="${BENCH_CALLS:-20000}"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
work=$(mktemp -d)
cleanup() { redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

# breakwater's claim script, as compiled in.
per_id_script=$(python3 - <<'PY'
import re
source = open("src/dedup/redis.rs").read()
body = re.search(r'const CLAIM_SCRIPT: &str = "(.*?)";', source, re.S).group(1)
print(re.sub(r"\\\n\s*", "", body))
PY
)
# Both candidates: what an id's current holder (`old`) says: 0 claim it (free, ours,
# or its request died), 1 already delivered, 2 another request is delivering it.
owner_verdict="local o = 0 \
  if old and old ~= token then \
    local state = owners[old] \
    if state == nil then state = redis.call('GET', prefix .. old) or 'gone'; owners[old] = state end \
    if state == 'd' then o = 1 elseif state == 'p' then o = 2 end \
  end"
bucket_script="local token, ttl = ARGV[1], tonumber(ARGV[3]) \
local prefix, buckets, legacy = ARGV[4], ARGV[5], ARGV[6] \
local b = math.floor(tonumber(redis.call('TIME')[1]) / ttl) \
local cur, prev = buckets .. b, buckets .. (b - 1) \
local out, owners, claimed = {}, {}, false \
for i = 7, #ARGV do \
  local id = ARGV[i] \
  local old = redis.call('HGET', cur, id) or redis.call('HGET', prev, id) \
  if not old and legacy ~= '' then old = redis.call('GET', legacy .. id) end \
  $owner_verdict \
  if o == 0 then redis.call('HSET', cur, id, token); claimed = true end \
  out[#out + 1] = o \
end \
if claimed then redis.call('EXPIREAT', cur, (b + 2) * ttl + 60) redis.call('SET', KEYS[1], 'p', 'PX', ARGV[2]) end \
return out"

# The same, with each step one command for all of a call's ids (HMGET, HMGET, one
# HSET), and the per-id keys, when read, in one MGET for the ids both buckets lack.
batched_script="local token, ttl = ARGV[1], tonumber(ARGV[3]) \
local prefix, buckets, legacy = ARGV[4], ARGV[5], ARGV[6] \
local b = math.floor(tonumber(redis.call('TIME')[1]) / ttl) \
local cur, prev = buckets .. b, buckets .. (b - 1) \
local ids = {} \
for i = 7, #ARGV do ids[#ids + 1] = ARGV[i] end \
local now = redis.call('HMGET', cur, unpack(ids)) \
local before = redis.call('HMGET', prev, unpack(ids)) \
if legacy ~= '' then \
  local missing, at = {}, {} \
  for i = 1, #ids do if not now[i] and not before[i] then missing[#missing + 1] = legacy .. ids[i]; at[#at + 1] = i end end \
  if #missing > 0 then \
    local found = redis.call('MGET', unpack(missing)) \
    for j = 1, #missing do before[at[j]] = found[j] end \
  end \
end \
local out, owners, claim = {}, {}, {} \
for i = 1, #ids do \
  local old = now[i] or before[i] \
  $owner_verdict \
  if o == 0 then claim[#claim + 1] = ids[i]; claim[#claim + 1] = token end \
  out[i] = o \
end \
if #claim > 0 then \
  redis.call('HSET', cur, unpack(claim)) \
  redis.call('EXPIREAT', cur, (b + 2) * ttl + 60) \
  redis.call('SET', KEYS[1], 'p', 'PX', ARGV[2]) \
end \
return out"

stat() { redis-cli -p "$port" info "$1" | tr -d '\r'; }
measure() { # name, prefill (0/1), redis-benchmark arguments...
  local name=$1 prefill=$2
  shift 2
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --daemonize yes \
    --logfile "$work/redis.log" >/dev/null
  for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  if [ "$prefill" = 1 ]; then
    local bucket=$(( $(date +%s) / 86400 - 1 ))
    redis-benchmark -p "$port" -n 1000000 -r 1000000000 -P 100 HSET "bw::ids:web:$bucket" "old-__rand_int__" c:000000000000000000000009 >/dev/null
    redis-benchmark -p "$port" -n 1000000 -r 1000000000 -P 100 SET "bw:web:old-__rand_int__" c:000000000000000000000009 EX 86400 >/dev/null
  fi
  local cpu0 mem0 cpu1 mem1
  cpu0=$(stat cpu | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {print s}')
  mem0=$(stat memory | awk -F: '/^used_memory:/ {print $2}')
  redis-benchmark -p "$port" -n "$calls" -r 1000000000 -c 8 "$@" >/dev/null
  cpu1=$(stat cpu | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {print s}')
  mem1=$(stat memory | awk -F: '/^used_memory:/ {print $2}')
  awk -v c0="$cpu0" -v c1="$cpu1" -v m0="$mem0" -v m1="$mem1" -v ids=$((calls * 100)) -v name="$name" \
    -v state="$([ "$prefill" = 1 ] && echo "after 1 M other ids" || echo "empty Redis")" \
    'BEGIN { printf "%-48s %-20s Redis CPU %.2f µs per id, memory %.0f bytes per id\n", name, state, (c1 - c0) * 1e6 / ids, (m1 - m0) / ids }'
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  sleep 0.3
}

token=c:0123456789abcdef01234567
keys=(); ids=()
for _ in $(seq 1 100); do
  keys+=("bw:web:run-0123456789abcdef-7-__rand_int__")
  ids+=("run-0123456789abcdef-7-__rand_int__")
done
echo "redis $(redis-server --version | awk '{print $3}'), ${calls} calls x 100 ids per scheme"
for prefill in 0 1; do
  measure "per-id keys (breakwater's claim script)" "$prefill" \
    EVAL "$per_id_script" 100 "${keys[@]}" "$token" "bw::claim:$token" 120000 86400 bw::claim:
  measure "bucket hashes, also reading per-id keys" "$prefill" \
    EVAL "$bucket_script" 1 "bw::claim:$token" "$token" 120000 86400 bw::claim: bw::ids:web: bw:web: "${ids[@]}"
  measure "bucket hashes only" "$prefill" \
    EVAL "$bucket_script" 1 "bw::claim:$token" "$token" 120000 86400 bw::claim: bw::ids:web: "" "${ids[@]}"
  measure "bucket hashes, one command per step" "$prefill" \
    EVAL "$batched_script" 1 "bw::claim:$token" "$token" 120000 86400 bw::claim: bw::ids:web: "" "${ids[@]}"
  measure "… also reading per-id keys (one MGET)" "$prefill" \
    EVAL "$batched_script" 1 "bw::claim:$token" "$token" 120000 86400 bw::claim: bw::ids:web: bw:web: "${ids[@]}"
done
