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
variants="1 2 2per_worker"
for v in $variants; do
  w=${v:0:1}; accept=shared; [ "$v" = 2per_worker ] && accept=per_worker
  cat > "$work/w$v.toml" <<CFG
this_node = "bench"
workers = $w
accept = "$accept"
[limits]
max_connections = 9000
[[nodes]]
name = "bench"
tls = "127.0.0.2:19443"
http = "127.0.0.2:19080"
[[sites]]
names = ["pass.test"]
passthrough = "$backend"
CFG
done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
: > "$work/rows"
for round in $(seq "$rounds"); do
  for w in $variants; do
    setsid $bin run --config "$work/w$w.toml" 2>"$work/log" & pid=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.2/19443) 2>/dev/null && break; sleep 0.05; done
    $gen connrate 127.0.0.2:19443 1 8 > /dev/null
    t0=$(ticks $pid); out=$($gen connrate 127.0.0.2:19443 "$secs" 32); t1=$(ticks $pid)
    echo "$w $out $(( t1 - t0 ))" >> "$work/rows"
    echo "round $round workers=$w: $out cpu_ticks=$(( t1 - t0 ))"
    kill -TERM -- "-$pid"; wait $pid 2>/dev/null || true
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
