#!/usr/bin/env bash
# Side-by-side comparison: sni-router vs HAProxy, nginx (stream +
# ssl_preread) and sniproxy, one worker each, raw-byte backends, a captured
# post-quantum ClientHello replayed over TCP (no TLS work on either side);
# then TLS 1.3 termination against nginx (stream + ssl) with the same ECDSA
# P-256 certificate, with clients listing AES-256-GCM first (OpenSSL's
# order) and AES-128-GCM first (browsers'); then an open loop (Poisson
# arrivals) at 25-90% of the slowest router's closed-loop rate. sni-router
# runs as shipped, logging a line per connection to a file; its connection
# test runs once more without that line, to show the line's own cost.
# Installs the peers from Debian when missing, alternates runs, and prints
# medians and ratios; writes docs/benchmarks-results.{json,md} and charts.
#
#   benches/compare.sh [ROUNDS] [SECONDS] [IDLE_CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-5}; idle=${3:-7000}
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

need=()
command -v haproxy >/dev/null || need+=(haproxy)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(nginx libnginx-mod-stream)
command -v sniproxy >/dev/null || need+=(sniproxy)
command -v gnuplot >/dev/null || need+=(gnuplot-nox)
. benches/apt.sh
apt_install ${need[@]+"${need[@]}"}
ulimit -n "$(ulimit -Hn)"  # this machine caps it at 20000: size the peers to fit
. benches/loopback.sh

cargo build --release --quiet --bin sni-router --example loadgen
bin=target/release/sni-router; gen=target/release/examples/loadgen
backend=127.0.0.1:19001; sink=127.0.0.1:19002
$gen backend $backend reply1k & $gen backend $sink sink & sleep 0.3

. benches/routers.sh
tls_port=19444
# One ECDSA P-256 certificate for both TLS terminators.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=tls.test -addext subjectAltName=DNS:tls.test \
  -keyout "$work/tls-key.pem" -out "$work/tls-cert.pem" 2>/dev/null
cat > "$work/haproxy.cfg" <<CFG
global
  nbthread 1
  maxconn 7500  # HAProxy asks for 2.5 descriptors per connection; this machine caps them at 20000
defaults
  mode tcp
  timeout connect 5s
  timeout client 5m
  timeout server 5m
frontend fe
  bind 127.0.0.3:$port
  tcp-request inspect-delay 5s
  tcp-request content accept if { req_ssl_hello_type 1 }
  use_backend be if { req_ssl_sni -i pass.test }
  use_backend bulk if { req_ssl_sni -i bulk.test }
backend be
  option splice-auto
  server s1 $backend
backend bulk
  option splice-auto
  server s2 $sink
CFG
cat > "$work/nginx.conf" <<CFG
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_rlimit_nofile 19000;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 19000; }  # both ends count: 9500 routed
stream {
  map \$ssl_preread_server_name \$target { pass.test $backend; bulk.test $sink; }
  server { listen 127.0.0.4:$port; ssl_preread on; proxy_pass \$target; }
  server {
    listen 127.0.0.4:$tls_port ssl;
    ssl_certificate $work/tls-cert.pem;
    ssl_certificate_key $work/tls-key.pem;
    ssl_protocols TLSv1.3;
    ssl_session_tickets on;
    proxy_pass $backend;
  }
}
CFG
sni_router_config "$work/sni-router.toml"
sniproxy_config "$work/sniproxy.conf"

# Where each TLS terminator listens (sni-router terminates on its one port by SNI).
declare -A tls_addr=([sni-router]=127.0.0.2:$port [nginx]=127.0.0.4:$tls_port)
stop() { stop_group "$pid"; }
# User-space memory of a router: RSS of its process tree, in KiB.
rss() { local total=0; for p in $(pgrep -P "$1") "$1"; do total=$((total + $(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null || echo 0))); done; echo $total; }
# Runs a load command against the router, printing its JSON with the
# router's CPU seconds added as "cpu_s".
measured() { local t0 out; t0=$(ticks "$pid"); out=$("$@"); echo "${out%\}}, \"cpu_s\": $(python3 -c "print(($(ticks "$pid") - $t0) / $hz)")}"; }

# held KEY COUNT WAIT CMD...: the router's RSS before and WAIT seconds into
# CMD, which opens COUNT connections and holds them; one result row.
held() {
  local key=$1 count=$2 wait=$3 before after holder; shift 3
  before=$(rss "$pid")
  "$@" > /dev/null & holder=$!
  sleep "$wait"
  after=$(rss "$pid")
  wait $holder || true
  echo "{\"router\":\"$r\",\"$key\":$count,\"rss_before_kib\":$before,\"rss_after_kib\":$after}" >> "$results"
  echo "$key $r: $before KiB -> $after KiB for $count connections"
}

routers=(sni-router haproxy nginx sniproxy)
results="$work/results.jsonl"; : > "$results"
for round in $(seq "$rounds"); do
  # Rotate the order each round so no router always runs first or last.
  order=("${routers[@]:$((round % 4))}" "${routers[@]:0:$((round % 4))}")
  for r in "${order[@]}"; do
    start_router "$r"
    c=$(measured $gen connrate "${addr[$r]}" "$secs" 32)
    b=$(measured $gen bulk "${addr[$r]}" "$secs" 4)
    echo "{\"router\":\"$r\",\"round\":$round,\"secs\":$secs,\"connrate\":$c,\"bulk\":$b}" >> "$results"
    echo "round $round $r: $c $b"
    if [ "$r" = sni-router ]; then
      stop; start_router sni-router-nolog
      q=$(measured $gen connrate "${addr[$r]}" "$secs" 32)
      echo "{\"router\":\"sni-router-nolog\",\"round\":$round,\"secs\":$secs,\"connrate\":$q}" >> "$results"
      echo "round $round sni-router without its log line: $q"
      stop; start_router sni-router
    fi
    if [ -n "${tls_addr[$r]:-}" ]; then
      f=$(measured $gen tls "${tls_addr[$r]}" "$secs" 32 full)
      # The same with a client listing AES-128-GCM first, as browsers do:
      # both servers then agree on the same suite.
      g=$(measured $gen tls "${tls_addr[$r]}" "$secs" 32 full aes128)
      s=$(measured $gen tls "${tls_addr[$r]}" "$secs" 32 resume)
      echo "{\"router\":\"$r\",\"round\":$round,\"secs\":$secs,\"tls_full\":$f,\"tls_full_aes128\":$g,\"tls_resume\":$s}" >> "$results"
      echo "round $round $r TLS: $f $g $s"
    fi
    stop
  done
done
# Reference: the same load straight at the backend, no router.
direct_c=$($gen connrate "$backend" "$secs" 32); direct_b=$($gen bulk "$sink" "$secs" 4)
echo "{\"router\":\"direct\",\"connrate\":$direct_c,\"bulk\":$direct_b}" >> "$results"
echo "direct: $direct_c $direct_b"
# The open loop: arrivals on a Poisson schedule at fractions of the
# slowest router's closed-loop rate (its median above), each router in
# turn at each rate, ROUNDS times, the order rotating. One run's p99 rests
# on its worst 50 ms or so, and on this machine any router's run now and
# then meets a stall of 10-50 ms that is the machine's (docs/benchmarks.md,
# "Stalls"): medians over the rounds, and the range, are what can be
# compared.
slowest=$(python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rates = {}
for x in rows:
    if "bulk" in x:
        rates.setdefault(x["router"], []).append(x["connrate"]["conns_per_sec"])
print(int(min(statistics.median(v) for v in rates.values())))
PY
)
echo "open loop at fractions of $slowest conn/s"
i=0
for pct in 25 50 75 90; do
  rate=$((slowest * pct / 100))
  for round in $(seq "$rounds"); do
    order=("${routers[@]:$((i % 4))}" "${routers[@]:0:$((i % 4))}"); i=$((i + 1))
    for r in "${order[@]}"; do
      start_router "$r"
      # Warm up as for the memory figures below: a router's first second
      # (pools, allocator arenas, the kernel's socket caches) is not its
      # steady state, and here every router gets the same second.
      $gen connrate "${addr[$r]}" 1 8 > /dev/null
      o=$(measured $gen openloop "${addr[$r]}" "$secs" "$rate")
      echo "{\"router\":\"$r\",\"round\":$round,\"secs\":$secs,\"load_pct\":$pct,\"openloop\":$o}" >> "$results"
      echo "open loop $pct% ($rate/s) round $round $r: $o"
      stop
    done
  done
done
for r in "${routers[@]}"; do
  start_router "$r"; sleep 0.5
  # Warm up first (pooled pipes, buffers), so only per-connection state counts.
  $gen connrate "${addr[$r]}" 1 8 > /dev/null
  held idle "$idle" 6 $gen idle "${addr[$r]}" "$idle" 8
  if [ -n "${tls_addr[$r]:-}" ]; then
    # Live TLS connections: handshaken, upstream connected, then quiet.
    $gen tls "${tls_addr[$r]}" 1 8 full > /dev/null
    held tls_idle $((idle / 2)) 8 $gen tlsidle "${tls_addr[$r]}" $((idle / 2)) 10
  fi
  stop
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
routers = ["sni-router", "haproxy", "nginx", "sniproxy"]
def med(r, key, f):
    v = [f(x) for x in rows if x["router"] == r and key in x]
    return statistics.median(v) if v else 0
def per_conn_us(x):  # router CPU per connection, microseconds
    n = x["connrate"]["conns_per_sec"] * x["secs"]
    return x["connrate"]["cpu_s"] / n * 1e6 if n else 0
def per_gib_s(x):    # router CPU per GiB moved, seconds
    gib = x["bulk"]["mib_per_sec"] * x["secs"] / 1024
    return x["bulk"]["cpu_s"] / gib if gib else 0
def log_line_cost():
    mine = [per_conn_us(x) for x in rows if x["router"] == "sni-router" and "bulk" in x]
    quiet = [per_conn_us(x) for x in rows if x["router"] == "sni-router-nolog"]
    return statistics.median(mine) - statistics.median(quiet) if mine and quiet else 0
table = {}
for r in routers:
    idle = next(x for x in rows if x["router"] == r and "idle" in x)
    table[r] = {
        "conns_per_sec": med(r, "connrate", lambda x: x["connrate"]["conns_per_sec"]),
        "p50_ms": med(r, "connrate", lambda x: x["connrate"]["p50_ms"]),
        "p99_ms": med(r, "connrate", lambda x: x["connrate"]["p99_ms"]),
        "cpu_us_per_conn": med(r, "connrate", per_conn_us),
        "bulk_mib_per_sec": med(r, "connrate", lambda x: x["bulk"]["mib_per_sec"]),
        "cpu_s_per_gib": med(r, "connrate", per_gib_s),
        "idle_kib_per_conn": max(0, idle["rss_after_kib"] - idle["rss_before_kib"]) / idle["idle"],
    }
tls = {}
for r in ["sni-router", "nginx"]:
    idle = next(x for x in rows if x["router"] == r and "tls_idle" in x)
    tls[r] = {
        "full_per_sec": med(r, "tls_full", lambda x: x["tls_full"]["conns_per_sec"]),
        "full_p99_ms": med(r, "tls_full", lambda x: x["tls_full"]["p99_ms"]),
        "full_cpu_us": med(r, "tls_full", lambda x: x["tls_full"]["cpu_s"] / max(1, x["tls_full"]["conns_per_sec"] * x["secs"]) * 1e6),
        "suite": next(x["tls_full"]["suite"] for x in rows if x["router"] == r and "tls_full" in x),
        "aes128_first_per_sec": med(r, "tls_full_aes128", lambda x: x["tls_full_aes128"]["conns_per_sec"]),
        "aes128_first_suite": next(x["tls_full_aes128"]["suite"] for x in rows if x["router"] == r and "tls_full_aes128" in x),
        "resumed_per_sec": med(r, "tls_resume", lambda x: x["tls_resume"]["conns_per_sec"]),
        "resumed_share": med(r, "tls_resume", lambda x: x["tls_resume"]["resumed"] / max(1, x["tls_resume"]["conns_per_sec"] * x["secs"])),
        "kib_per_tls_conn": max(0, idle["rss_after_kib"] - idle["rss_before_kib"]) / idle["tls_idle"],
    }
opens = {}
for x in rows:
    if "openloop" in x:
        opens.setdefault(x["load_pct"], {}).setdefault(x["router"], []).append(
            x["openloop"] | {"cpu_us_per_conn": x["openloop"]["cpu_s"] / max(1, x["openloop"]["conns_per_sec"] * x["secs"]) * 1e6})
for pct, by in opens.items():
    for r, runs in by.items():
        m = lambda k: statistics.median(o[k] for o in runs)
        by[r] = {"offered_per_sec": runs[0]["offered_per_sec"], "p50_ms": m("p50_ms"), "p99_ms": m("p99_ms"),
                 "p99_min_ms": min(o["p99_ms"] for o in runs), "p99_max_ms": max(o["p99_ms"] for o in runs),
                 "p999_ms": m("p999_ms"), "late_p99_ms": m("late_p99_ms"),
                 "errors": sum(o["errors"] + o["skipped"] for o in runs), "cpu_us_per_conn": m("cpu_us_per_conn"),
                 "runs": len(runs)}
json.dump({"l4": table, "tls": tls, "open_loop": opens, "log_line_us": log_line_cost()},
          open("docs/benchmarks-results.json", "w"), indent=2)
h = table["haproxy"]
lines = ["| router | new conn/s | p50 ms | p99 ms | CPU us/conn | bulk MiB/s | CPU s/GiB | KiB per idle conn |",
         "|---|---|---|---|---|---|---|---|"]
d = next(x for x in rows if x["router"] == "direct")
lines.append(f"| direct, no router | {d['connrate']['conns_per_sec']:.0f} | {d['connrate']['p50_ms']:.2f} | {d['connrate']['p99_ms']:.2f} | - | {d['bulk']['mib_per_sec']:.0f} | - | - |")
for r in routers:
    t = table[r]
    lines.append(f"| {r} | {t['conns_per_sec']:.0f} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['cpu_us_per_conn']:.0f} | {t['bulk_mib_per_sec']:.0f} | {t['cpu_s_per_gib']:.2f} | {t['idle_kib_per_conn']:.2f} |")
s = table["sni-router"]
lines.append("")
lines.append(f"sni-router / HAProxy: new conn/s {s['conns_per_sec']/h['conns_per_sec']:.2f}x, "
             f"p99 {s['p99_ms']/h['p99_ms']:.2f}x, CPU per conn {s['cpu_us_per_conn']/h['cpu_us_per_conn']:.2f}x, "
             f"bulk {s['bulk_mib_per_sec']/h['bulk_mib_per_sec']:.2f}x, CPU per GiB {s['cpu_s_per_gib']/h['cpu_s_per_gib']:.2f}x, "
             f"idle memory {s['idle_kib_per_conn']/h['idle_kib_per_conn']:.2f}x")
lean = min(routers[1:], key=lambda r: table[r]["cpu_us_per_conn"])
lines.append(f"sni-router's CPU per connection (with its log line, as shipped) / the leanest peer's ({lean}): "
             f"{s['cpu_us_per_conn']/table[lean]['cpu_us_per_conn']:.2f}x; the log line itself costs "
             f"{log_line_cost():.1f} us per connection")
lines.append("")
lines.append("| open loop: load (of the slowest router's closed-loop rate) | router | offered conn/s | p50 ms | p99 ms | p99 range ms | p99.9 ms | generator late, p99 ms | CPU us/conn | failed |")
lines.append("|---|---|---|---|---|---|---|---|---|---|")
for pct in sorted(opens):
    for r in routers:
        o = opens[pct].get(r)
        if o:
            lines.append(f"| {pct}% | {r} | {o['offered_per_sec']:.0f} | {o['p50_ms']:.2f} | {o['p99_ms']:.2f} | {o['p99_min_ms']:.2f}-{o['p99_max_ms']:.2f} | {o['p999_ms']:.2f} | {o['late_p99_ms']:.2f} | {o['cpu_us_per_conn']:.0f} | {o['errors']} |")
with open("docs/benchmarks-openloop.dat", "w") as f:
    for pct in sorted(opens):
        f.write(f"{pct} " + " ".join(f"{opens[pct].get(r, {}).get('p99_ms', 0):.3f}" for r in routers) + "\n")
lines.append("")
lines.append("| TLS 1.3 terminator | full handshakes/s | suite agreed | p99 ms | CPU us/handshake | full, AES-128-first client | resumed handshakes/s | resumed share | KiB per live TLS conn |")
lines.append("|---|---|---|---|---|---|---|---|---|")
for r in ["sni-router", "nginx"]:
    t = tls[r]
    lines.append(f"| {r} | {t['full_per_sec']:.0f} | {t['suite']} | {t['full_p99_ms']:.2f} | {t['full_cpu_us']:.0f} | {t['aes128_first_per_sec']:.0f} ({t['aes128_first_suite']}) | {t['resumed_per_sec']:.0f} | {t['resumed_share']:.0%} | {t['kib_per_tls_conn']:.2f} |")
a, n = tls["sni-router"], tls["nginx"]
lines.append("")
lines.append(f"sni-router / nginx: full handshakes/s {a['full_per_sec']/n['full_per_sec']:.2f}x "
             f"({a['aes128_first_per_sec']/n['aes128_first_per_sec']:.2f}x with an AES-128-first client), "
             f"resumed {a['resumed_per_sec']/n['resumed_per_sec']:.2f}x, "
             f"memory per TLS conn {a['kib_per_tls_conn']/n['kib_per_tls_conn']:.2f}x")
open("docs/benchmarks-results.md", "w").write("\n".join(lines) + "\n")
with open("docs/benchmarks-ratios.dat", "w") as f:
    for r in routers:
        t = table[r]
        f.write(f"{r} {t['conns_per_sec']/h['conns_per_sec']:.3f} {t['bulk_mib_per_sec']/h['bulk_mib_per_sec']:.3f} {h['idle_kib_per_conn']/max(t['idle_kib_per_conn'], 0.01):.3f}\n")
print("\n".join(lines))
PY
gnuplot <<'GP'
set terminal pngcairo size 800,420 font ",11" noenhanced
set output "docs/benchmarks.png"
set title "Relative to HAProxy (1.0 = HAProxy; higher is better)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set yrange [0:*]
set grid ytics
set key top right
plot "docs/benchmarks-ratios.dat" using 2:xtic(1) title "new connections/s", "" using 3 title "bulk MiB/s", "" using 4 title "idle connections per KiB"
GP
gnuplot <<'GP'
set terminal pngcairo size 800,420 font ",11" noenhanced
set output "docs/benchmarks-openloop.png"
set title "Open loop: p99 connection latency by offered load (lower is better)"
set xlabel "offered load, % of the slowest router's closed-loop rate"
set ylabel "p99 ms"
set grid
set key top left
plot for [i=2:5] "docs/benchmarks-openloop.dat" using 1:i with linespoints title word("sni-router haproxy nginx sniproxy", i-1)
GP
echo "wrote docs/benchmarks-results.md, docs/benchmarks-results.json, docs/benchmarks.png, docs/benchmarks-openloop.png"

# Scale: 100k sites (half with a wildcard) load, check and route.
python3 - "$work/100k.toml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write('this_node = "a"\n[[nodes]]\nname = "a"\ntls = "127.0.0.2:19543"\nhttp = "127.0.0.2:19580"\n')
    for i in range(100_000):
        names = f'"s{i}.example.org", "*.s{i}.example.org"' if i % 2 == 0 else f'"s{i}.example.org"'
        f.write(f'[[sites]]\nnames = [{names}]\npassthrough = "{sys.argv[1] and "127.0.0.1:19001"}"\n')
PY
/usr/bin/time -f "%e s %M KiB" -o "$work/scale.txt" $bin check --config "$work/100k.toml" > /dev/null
echo "100k sites: check took $(cat "$work/scale.txt") (elapsed, peak RSS)" | tee docs/benchmarks-scale.txt
