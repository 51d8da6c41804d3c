#!/usr/bin/env bash
# Where each router's CPU per connection goes: sni-router and sniproxy (the
# leanest peer) in turn under the same closed-loop connection load as
# benches/compare.sh (32 clients, a captured ClientHello, a 1 KiB reply),
# sampled with `perf record -e cpu-clock -g` and attributed to the system
# call each sample was in, or to user space. Prints microseconds per
# connection by call, side by side, medians of the rounds. With RATE, the
# load is open loop instead: Poisson arrivals at RATE a second (4000 is
# about a quarter of this machine's capacity).
#
#   benches/where-cpu-goes.sh [ROUNDS] [SECONDS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-4}; rate=${3:-}
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
need=()
command -v perf >/dev/null || need+=(linux-perf)
command -v sniproxy >/dev/null || need+=(sniproxy)
. benches/apt.sh
apt_install ${need[@]+"${need[@]}"}
ulimit -n "$(ulimit -Hn)"
. benches/loopback.sh
cargo build --release --quiet --bin sni-router --example loadgen
bin=target/release/sni-router; gen=target/release/examples/loadgen
backend=127.0.0.1:19001
$gen backend $backend reply1k & sleep 0.3
. benches/routers.sh
sni_router_config "$work/sni-router.toml"
sniproxy_config "$work/sniproxy.conf"
for round in $(seq "$rounds"); do
  for r in sni-router sniproxy; do
    start_router "$r"
    $gen connrate "${addr[$r]}" 1 8 > /dev/null  # warm-up, as in compare.sh
    perf record -q -e cpu-clock -F 4999 -g -p "$pid" -o "$work/$r-$round.data" -- sleep $((secs + 1)) 2>/dev/null &
    perf_pid=$!
    sleep 0.2
    if [ -n "$rate" ]; then
      load=$($gen openloop "${addr[$r]}" "$secs" "$rate")
    else
      load=$($gen connrate "${addr[$r]}" "$secs" 32)
    fi
    wait $perf_pid || true
    echo "$r $round $load"
    perf script -i "$work/$r-$round.data" -F ip,sym > "$work/$r-$round.txt" 2>/dev/null
    echo "$load" > "$work/$r-$round.load"
    stop_group "$pid"
  done
done
python3 - "$work" "$rounds" "$secs" <<'PY'
import collections, json, statistics, sys
work, rounds, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
us_per_sample = 1e6 / 4999

def attribute(path):
    """Samples by the system call they were in (the kernel's __x64_sys_*
    or __sys_* frame), else user space."""
    counts, stack = collections.Counter(), []
    def flush():
        if not stack:
            return
        key = "user space"
        for frame in stack:
            for prefix in ("__x64_sys_", "__do_sys_", "__sys_"):
                if frame.startswith(prefix):
                    key = frame[len(prefix):]
        if key == "user space" and any(f.startswith("entry_SYSCALL") or f.startswith("asm_") for f in stack):
            key = "other kernel"
        counts[key] += 1
    for line in open(path):
        line = line.strip()
        if not line:
            flush(); stack.clear(); continue
        parts = line.split(None, 1)
        stack.append(parts[1] if len(parts) > 1 else "?")
    flush()
    return counts

per = {}
for r in ("sni-router", "sniproxy"):
    rows = []
    for i in range(1, rounds + 1):
        load = json.load(open(f"{work}/{r}-{i}.load"))
        conns = load["conns_per_sec"] * secs
        c = attribute(f"{work}/{r}-{i}.txt")
        rows.append({k: v * us_per_sample / conns for k, v in c.items()} | {"total": sum(c.values()) * us_per_sample / conns})
    keys = set().union(*rows)
    per[r] = {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}
keys = sorted(set(per["sni-router"]) | set(per["sniproxy"]), key=lambda k: -max(per["sni-router"].get(k, 0), per["sniproxy"].get(k, 0)))
print("| where | sni-router us/conn | sniproxy us/conn |")
print("|---|---|---|")
for k in keys:
    a, b = per["sni-router"].get(k, 0), per["sniproxy"].get(k, 0)
    if max(a, b) >= 0.1:
        print(f"| {k} | {a:.2f} | {b:.2f} |")
PY
