# Sourced by the bench scripts that load sni-router and its peers alike
# (compare.sh, where-cpu-goes.sh, workers.sh, cpu-per-conn.sh): one
# sni-router and one sniproxy config for all of them, and how a router is
# started, awaited, measured and stopped. Expects $work, $bin and
# $backend; with $sink set the configs route bulk.test to it, and with
# $work/tls-cert.pem and $work/tls-key.pem present sni-router terminates
# tls.test.

port=19443
# Where each router listens: a 127.0.0.x of its own, so no two share a
# socket, and a leftover from one cannot take another's connections.
declare -A addr=([sni-router]=127.0.0.2:$port [sni-router-nolog]=127.0.0.2:$port
  [haproxy]=127.0.0.3:$port [nginx]=127.0.0.4:$port [sniproxy]=127.0.0.5:$port
  [floor-tokio]=127.0.0.6:$port [floor-mio]=127.0.0.7:$port [floor-mio-rw]=127.0.0.8:$port)

# sni_router_config FILE [WORKERS] [ACCEPT]: one node holding the bench
# names, a log line per connection as shipped.
sni_router_config() {
  local file=$1 workers=${2:-1} accept=${3:-shared}
  cat > "$file" <<CFG
this_node = "bench"
workers = $workers
accept = "$accept"
[limits]
max_connections = 9000
max_pending_hellos = 9000
[[nodes]]
name = "bench"
tls = "${addr[sni-router]}"
http = "127.0.0.2:19080"
[[sites]]
names = ["pass.test"]
passthrough = "$backend"
CFG
  if [ -n "${sink:-}" ]; then
    printf '[[sites]]\nnames = ["bulk.test"]\npassthrough = "%s"\n' "$sink" >> "$file"
  fi
  if [ -e "$work/tls-cert.pem" ]; then
    cat >> "$file" <<CFG
[[sites]]
names = ["tls.test"]
held_by = ["bench"]
upstream = "$backend"
cert_file = "$work/tls-cert.pem"
key_file = "$work/tls-key.pem"
CFG
  fi
}

# sniproxy_config FILE: the same routes for sniproxy.
sniproxy_config() {
  cat > "$1" <<CFG
user nobody
pidfile $work/sniproxy.pid
error_log { filename $work/sniproxy-error.log }
listener ${addr[sniproxy]%:*}:$port {
  protocol tls
  table bench
}
table bench {
  pass\.test $backend
${sink:+  bulk\\.test $sink}
}
CFG
}

# listening ADDR: waits (at most 5 s) until ADDR accepts connections.
listening() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return; sleep 0.05; done
}

# start_router NAME [BIN]: starts router NAME (a key of addr; BIN is the
# sni-router binary, $bin by default) in a process group of its own
# (setsid execs it, so $! is the router and its group), sets $pid and
# waits until it listens. sni-router runs as shipped: a log line per
# connection, to a file; sni-router-nolog without that line.
start_router() {
  local b=${2:-${bin:-}}
  case $1 in
    sni-router) setsid "$b" run --config "$work/sni-router.toml" 2>"$work/sni-router.log" & ;;
    sni-router-nolog) RUST_LOG=warn setsid "$b" run --config "$work/sni-router.toml" 2>"$work/sni-router.log" & ;;
    haproxy) setsid haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 & ;;
    nginx) setsid nginx -c "$work/nginx.conf" >"$work/nginx.log" 2>&1 & ;;
    sniproxy) setsid sniproxy -f -c "$work/sniproxy.conf" >"$work/sniproxy.log" 2>&1 & ;;
    # The least a Rust program does per connection (examples/floor.rs).
    floor-tokio|floor-mio|floor-mio-rw) setsid target/release/examples/floor "${1#floor-}" "${addr[$1]}" "$backend" 2>"$work/$1.log" & ;;
    *) echo "start_router: no router named $1" >&2; return 1 ;;
  esac
  pid=$!
  listening "${addr[$1]}"
}

# stop_group PID: stops a router started with setsid (PID leads its process
# group) by that group, never by name: nginx's master and its worker go
# together, and nothing else on the machine is touched.
stop_group() {
  kill -TERM -- "-$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 -- "-$1" 2>/dev/null || break; sleep 0.05; done
  kill -KILL -- "-$1" 2>/dev/null || true
  sleep 0.3
}

# ticks PID: CPU time (user + system) of a router's process tree, in clock ticks.
ticks() {
  local total=0
  for p in $(pgrep -P "$1") "$1"; do
    total=$((total + $(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0)))
  done
  echo $total
}
hz=$(getconf CLK_TCK)
