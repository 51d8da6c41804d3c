#!/usr/bin/env bash
# User-space instructions per routed connection (passthrough, 1 KiB reply)
# of the router binary BIN, counted by callgrind between a zero and a dump,
# at the shipped log level (one line per connection), one worker.
# Instruction counts do not depend on what else the machine is doing, so
# two builds can be compared one after the other:
#
#   benches/instructions.sh BIN TAG
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example loadgen
bin=$1; tag=$2
w=/tmp/ir-$tag; rm -rf $w; mkdir -p $w
cat > $w/r.toml <<CFG
this_node = "a"
workers = 1
[[nodes]]
name = "a"
tls = "127.0.0.3:18443"
http = "127.0.0.3:18080"
[[sites]]
names = ["pass.test"]
passthrough = "127.0.0.1:19001"
CFG
L=target/release/examples/loadgen
$L backend 127.0.0.1:19001 reply1k & bp=$!
valgrind --tool=callgrind --callgrind-out-file=$w/cg.out $bin run --config $w/r.toml > $w/log 2>&1 & vp=$!
for i in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.3/18443) 2>/dev/null && break; sleep 0.1; done
$L connrate 127.0.0.3:18443 2 2 > /dev/null
sleep 1
callgrind_control -z $vp > /dev/null
before=$(grep -c "connection finished" $w/log)
$L connrate 127.0.0.3:18443 8 2 > $w/load
sleep 2
after=$(grep -c "connection finished" $w/log)
callgrind_control -d $vp > /dev/null
sleep 1
kill $vp $bp; wait 2>/dev/null || true
n=$((after-before))
f=$w/cg.out.1
ir=$(callgrind_annotate $f 2>/dev/null | grep "PROGRAM TOTALS" | awk '{gsub(",","",$1); print $1}')
echo "$tag connections=$n Ir=$ir per_conn=$((ir / n))"
