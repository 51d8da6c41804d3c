#!/usr/bin/env bash
# 50k concurrent idle routed connections on a machine whose hard open-file
# limit is below what one process needs for them (2 descriptors each).
# Several sni-router processes share one listener through SO_REUSEPORT, as
# they do during a restart; so do several sink backends and clients. Prints
# how many connections were held at once and the routers' user-space memory
# per connection, and writes docs/benchmarks-idle-50k.txt.
#
#   benches/idle-50k.sh [CONNECTIONS=50000] [ROUTERS=7]
set -euo pipefail
cd "$(dirname "$0")/.."

total=${1:-50000}
routers=${2:-7}
clients=5
sinks=4
hold=600 # longer than any run; killed at the end
port=19643

ulimit -n "$(ulimit -Hn)"
. benches/loopback.sh
limit=$(ulimit -n)
per_router=$(( (total + routers - 1) / routers ))
if (( per_router * 23 / 10 > limit )); then
  echo "open-file limit $limit is too low for $per_router connections per router: add routers" >&2
  exit 1
fi

cargo build --release --quiet --bin sni-router --example loadgen
gen=target/release/examples/loadgen
bin=target/release/sni-router
work=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# KiB of user-space memory (RSS) over the given processes.
rss() {
  local sum=0 pid
  for pid in "$@"; do
    sum=$(( sum + $(awk '/^Rss:/ {print $2}' "/proc/$pid/smaps_rollup") ))
  done
  echo "$sum"
}

established() { # connections in ESTABLISHED state with local port $1
  ss -Htn state established "( sport = :$1 )" | wc -l
}

sink_pids=()
for _ in $(seq "$sinks"); do
  "$gen" backend "127.0.0.1:$((port + 1))" sink &
  sink_pids+=($!)
  pids+=($!)
done
sleep 0.5
for pid in "${sink_pids[@]}"; do
  kill -0 "$pid" 2>/dev/null || { echo "a sink could not listen on 127.0.0.1:$((port + 1))" >&2; exit 1; }
done
cat >"$work/router.toml" <<CFG
this_node = "bench"
workers = 1
[limits]
max_connections = $((per_router * 3 / 2))
max_pending_hellos = $((per_router * 3 / 2))
[[nodes]]
name = "bench"
tls = "127.0.0.2:$port"
http = "127.0.0.2:$((port + 2))"
[[sites]]
names = ["bulk.test"]
passthrough = "127.0.0.1:$((port + 1))"
CFG
router_pids=()
for _ in $(seq "$routers"); do
  RUST_LOG=warn "$bin" run --config "$work/router.toml" 2>>"$work/router.log" &
  router_pids+=($!)
  pids+=($!)
done
sleep 2
before=$(rss "${router_pids[@]}")

client_pids=()
for _ in $(seq "$clients"); do
  "$gen" idle "127.0.0.2:$port" $((total / clients)) "$hold" >>"$work/clients.log" 2>&1 &
  client_pids+=($!)
  pids+=($!)
done
# Wait (bounded) until every client has opened its share.
for _ in $(seq 120); do
  opened=$(grep -c idle_connections "$work/clients.log" 2>/dev/null || true)
  [ "$opened" -ge "$clients" ] && break
  sleep 1
done
# Then until every routed connection reaches a sink (bounded), and past
# the one-second hand-over to the splice engines.
for _ in $(seq 40); do
  [ "$(established "$((port + 1))")" -ge "$(established "$port")" ] && break
  sleep 1
done
sleep 6
held=$(established "$port")
to_sinks=$(established "$((port + 1))")
after=$(rss "${router_pids[@]}")
per=$(awk -v a="$after" -v b="$before" -v n="$held" 'BEGIN { printf "%.2f", (a - b) / (n > 0 ? n : 1) }')

{
  echo "idle-50k: $routers sni-router processes (workers = 1 each) sharing 127.0.0.2:$port"
  echo "client connections held at once: $held (sinks see $to_sinks)"
  grep -h idle_connections "$work/clients.log" | tr '\n' ' '
  echo
  echo "routers' RSS: $before KiB -> $after KiB, $per KiB per routed connection"
  echo "open-file limit per process: $limit"
} | tee docs/benchmarks-idle-50k.txt
if grep -qE "WARN|ERROR" "$work/router.log"; then
  echo "router warnings:" >&2
  grep -E "WARN|ERROR" "$work/router.log" | head -5 >&2
fi
