#!/usr/bin/env bash
# Scaling on this machine: sni-router with 1 worker, 2 workers sharing one
# listening socket, and 2 workers with a socket each (accept = "per_worker"),
# alternately, on the short-connection test of compare.sh (32 clients, 1 KiB
# reply), with the CPU of the router per connection. Prints medians.
#
#   benches/workers.sh [ROUNDS=3] [SECONDS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-5}
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n "$(ulimit -Hn)"
. benches/loopback.sh
cargo build --release --quiet --bin sni-router --example loadgen
bin=target/release/sni-router; gen=target/release/examples/loadgen
backend=127.0.0.1:19001
$gen backend $backend reply1k & sleep 0.3
. benches/routers.sh
variants="1 2 2per_worker"
for v in $variants; do
  accept=shared; [ "$v" = 2per_worker ] && accept=per_worker
  sni_router_config "$work/w$v.toml" "${v:0:1}" "$accept"
done
: > "$work/rows"
for round in $(seq "$rounds"); do
  for w in $variants; do
    setsid $bin run --config "$work/w$w.toml" 2>"$work/log" & pid=$!
    listening "${addr[sni-router]}"
    $gen connrate "${addr[sni-router]}" 1 8 > /dev/null
    t0=$(ticks $pid); out=$($gen connrate "${addr[sni-router]}" "$secs" 32); t1=$(ticks $pid)
    echo "$w $out $(( t1 - t0 ))" >> "$work/rows"
    echo "round $round workers=$w: $out cpu_ticks=$(( t1 - t0 ))"
    stop_group "$pid"
  done
done
python3 - "$work/rows" "$secs" "$hz" <<'PY'
import json, statistics, sys
rows, secs, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
by = {}
for line in open(rows):
    w, rest = line.split(" ", 1)
    js, ticks = rest.rsplit(" ", 1)
    r = json.loads(js)
    by.setdefault(w, []).append((r["conns_per_sec"], r["p99_ms"], int(ticks) / hz / (r["conns_per_sec"] * secs) * 1e6))
for w, v in sorted(by.items()):
    print(f"workers={w}: {statistics.median(x[0] for x in v):.0f} conn/s, p99 {statistics.median(x[1] for x in v):.2f} ms, "
          f"{statistics.median(x[2] for x in v):.1f} us CPU per connection")
PY
