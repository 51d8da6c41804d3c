#!/usr/bin/env bash
# CPU per new spliced connection of one or more sni-router builds beside
# sniproxy (the leanest peer), in alternation, under the closed-loop load of
# benches/compare.sh (32 clients) and an open-loop load at RATE/s (Poisson
# arrivals; 4000/s is about a quarter of this machine's capacity, where an
# edge host spends most of its time). A captured ClientHello out, 1 KiB
# back, one worker, the log line on as shipped. Prints every run, then
# medians and ranges per build and load.
#
#   benches/cpu-per-conn.sh [ROUNDS=4] [SECONDS=5] [RATE=4000] [BIN...]
#
# With no BIN, the release build of this tree. Give two builds of different
# sources to see what a change is worth: CPU time moves with the machine's
# day-to-day speed, so only builds measured in the same run compare. A BIN
# of floor-tokio, floor-mio or floor-mio-rw runs examples/floor.rs instead:
# the least a Rust program does per connection, on tokio or on a bare mio
# loop (-rw: with its sockets registered as tokio registers them).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-4}; secs=${2:-5}; rate=${3:-4000}; shift $(($# < 3 ? $# : 3))
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
. benches/apt.sh
command -v sniproxy >/dev/null || apt_install sniproxy
ulimit -n "$(ulimit -Hn)"
. benches/loopback.sh
cargo build --release --quiet --bin sni-router --example loadgen --example floor
builds=("$@"); [ ${#builds[@]} -gt 0 ] || builds=(target/release/sni-router)
gen=target/release/examples/loadgen
backend=127.0.0.1:19001
$gen backend $backend reply1k & sleep 0.3
. benches/routers.sh
sni_router_config "$work/sni-router.toml"
sniproxy_config "$work/sniproxy.conf"
: > "$work/runs"
for round in $(seq "$rounds"); do
  # Rotate the order each round so no router always runs first.
  runners=("${builds[@]}" sniproxy)
  order=("${runners[@]:$((round % ${#runners[@]}))}" "${runners[@]:0:$((round % ${#runners[@]}))}")
  for load in closed open; do
    for r in "${order[@]}"; do
      if [ -n "${addr[$r]:-}" ]; then name=$r; else name=sni-router; fi
      start_router "$name" "$r"
      at=${addr[$name]}
      $gen connrate "$at" 1 8 > /dev/null  # warm-up, as in compare.sh
      t0=$(ticks "$pid")
      case $load in
        closed) out=$($gen connrate "$at" "$secs" 32) ;;
        open) out=$($gen openloop "$at" "$secs" "$rate") ;;
      esac
      t1=$(ticks "$pid")
      stop_group "$pid"
      echo "$r $load $((t1 - t0)) $out" | tee -a "$work/runs"
    done
  done
done
python3 - "$work/runs" "$secs" "$hz" <<'PY'
import collections, json, statistics, sys
path, secs, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
runs = collections.defaultdict(list)
for line in open(path):
    router, load, ticks, out = line.split(None, 3)
    conns = json.loads(out)["conns_per_sec"] * secs
    runs[(router, load)].append(int(ticks) / hz * 1e6 / conns)
print("| router | load | CPU us/conn, median | range |")
print("|---|---|---|---|")
for (router, load), us in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"| {router} | {load} | {statistics.median(us):.1f} | {min(us):.1f}-{max(us):.1f} |")
PY
