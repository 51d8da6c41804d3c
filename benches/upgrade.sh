#!/usr/bin/env bash
# Upgrades under load, side by side: sni-router upgraded in place
# (SIGUSR2: the binary on disk takes its listening sockets) and restarted by
# hand (a second process on the same config, then SIGTERM to the first),
# against HAProxy reloaded with -x (its listening sockets passed to the new
# process over its stats socket) and -sf. Each run puts the repository's
# load generator on the router (new connections back to back, the
# captured ClientHello out, 1 KiB back) and replaces the router UPGRADES
# times, 1.5 s apart; the same load with no replacement is each router's
# baseline. Prints connections lost (refused, reset or answered short) per
# replacement and the run's p50/p99; writes docs/benchmarks-upgrade.json.
# sni-router runs at the shipped log level (one line per connection, to a
# file).
#
#   benches/upgrade.sh [ROUNDS] [UPGRADES] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; upgrades=${2:-3}; clients=${3:-32}
work=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  pkill -f "$work/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
. benches/apt.sh
command -v haproxy >/dev/null || apt_install haproxy
ulimit -n "$(ulimit -Hn)"
. benches/loopback.sh

cargo build --release --quiet --bin sni-router --example loadgen
# The router runs from a copy in $work, as an installed binary would, so a
# rebuild meanwhile cannot change what an upgrade starts.
cp target/release/sni-router "$work/sni-router"
bin="$work/sni-router"; gen=target/release/examples/loadgen
backend=127.0.0.1:19501
$gen backend $backend reply1k & pids+=($!)
sleep 0.3
secs=$(( upgrades * 3 / 2 + 3 ))

. benches/routers.sh
sni_router_config "$work/sni-router.toml"
printf '[timeouts]\ndrain = "5s"\n' >> "$work/sni-router.toml"
cat > "$work/haproxy.cfg" <<CFG
global
  nbthread 1
  maxconn 7500
  stats socket $work/haproxy.sock mode 600 expose-fd listeners level user
defaults
  mode tcp
  timeout connect 5s
  timeout client 5m
  timeout server 5m
frontend fe
  bind ${addr[haproxy]}
  tcp-request inspect-delay 5s
  tcp-request content accept if { req_ssl_hello_type 1 }
  use_backend be if { req_ssl_sni -i pass.test }
backend be
  server s1 $backend
CFG

# Every process is stopped by what this script started it from ($bin, a
# copy in $work, and $work's HAProxy config), never by a bare name: nothing
# else on the machine is touched.
stop_haproxy() { pkill -f -- "-f $work/haproxy.cfg" 2>/dev/null || true; }
# The pid of the newest sni-router started from $bin.
newest() { pgrep -n -f "^$bin run"; }

results="$work/results.jsonl"; : > "$results"
for round in $(seq "$rounds"); do
  for mode in sni-router-steady sni-router-usr2 sni-router-by-hand haproxy-steady haproxy-x; do
    case $mode in
      haproxy-*)
        target=${addr[haproxy]}
        haproxy -f "$work/haproxy.cfg" -D -p "$work/haproxy.pid"
        ;;
      *)
        target=${addr[sni-router]}
        "$bin" run --config "$work/sni-router.toml" 2>>"$work/router.log" &
        ;;
    esac
    listening "$target"
    $gen connrate "$target" "$secs" "$clients" > "$work/load.json" &
    load=$!
    sleep 1.5
    n=$upgrades; case $mode in *-steady) n=0 ;; esac
    for _ in $(seq "$n"); do
      case $mode in
        sni-router-usr2)
          old=$(newest); kill -USR2 "$old"
          for _ in $(seq 200); do [ "$(newest)" != "$old" ] && break; sleep 0.01; done
          ;;
        sni-router-by-hand)
          old=$(newest); before=$(grep -c "new connections now come to this one" "$work/router.log" || true)
          "$bin" run --config "$work/sni-router.toml" 2>>"$work/router.log" &
          for _ in $(seq 500); do
            [ "$(grep -c "new connections now come to this one" "$work/router.log" || true)" -gt "$before" ] && break
            sleep 0.01
          done
          kill -TERM "$old"
          ;;
        haproxy-x)
          haproxy -f "$work/haproxy.cfg" -D -p "$work/haproxy.pid" -x "$work/haproxy.sock" -sf "$(cat "$work/haproxy.pid")"
          ;;
      esac
      sleep 1.5
    done
    wait "$load"
    out=$(cat "$work/load.json")
    echo "{\"mode\":\"$mode\",\"round\":$round,\"upgrades\":$n,\"load\":$out}" >> "$results"
    echo "round $round $mode: $out"
    case $mode in
      haproxy-*) kill "$(cat "$work/haproxy.pid")" 2>/dev/null || true ;;
      *) pkill -f "^$bin run" || true ;;
    esac
    sleep 1
    # What outlived that: old processes still draining.
    pkill -f "^$bin run" 2>/dev/null || true; stop_haproxy
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
out = {}
modes = ["sni-router-steady", "sni-router-usr2", "sni-router-by-hand", "haproxy-steady", "haproxy-x"]
print(f"{'mode':22} {'lost per upgrade':>17} {'conn/s':>8} {'p50 ms':>7} {'p99 ms':>7}  (medians of {len(rows)//len(modes)} rounds)")
for mode in modes:
    runs = [r for r in rows if r["mode"] == mode]
    if not runs:
        continue
    lost = statistics.median(r["load"]["errors"] / max(r["upgrades"], 1) for r in runs)
    total = sum(r["load"]["errors"] for r in runs)
    rate = statistics.median(r["load"]["conns_per_sec"] for r in runs)
    p50 = statistics.median(r["load"]["p50_ms"] for r in runs)
    p99 = statistics.median(r["load"]["p99_ms"] for r in runs)
    out[mode] = {"lost_per_upgrade_median": lost, "lost_total": total, "upgrades_total": sum(r["upgrades"] for r in runs),
                 "conns_per_sec": rate, "p50_ms": p50, "p99_ms": p99, "runs": [r["load"] for r in runs]}
    print(f"{mode:22} {lost:17.1f} {rate:8.0f} {p50:7.2f} {p99:7.2f}  ({total} lost over {out[mode]['upgrades_total']} upgrades)")
json.dump(out, open("docs/benchmarks-upgrade.json", "w"), indent=1)
PY
