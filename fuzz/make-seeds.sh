#!/usr/bin/env bash
# Regenerates fuzz/seeds/ from real clients: rustls (with its ML-KEM key
# share, via examples/capture_hello.rs), OpenSSL and curl, plus multi-record
# and truncated variants, and seeds for the other targets.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=fuzz/seeds
mkdir -p "$seeds"/{client_hello,http_head,proxy_header,config}

capture() { # name command...: runs a client against a one-shot listener
  local name=$1; shift
  python3 - "$seeds/client_hello/$name.bin" "$@" <<'PY'
import socket, subprocess, sys, threading
out, cmd = sys.argv[1], sys.argv[2:]
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
port = srv.getsockname()[1]
cmd = [c.replace("PORT", str(port)) for c in cmd]
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
srv.settimeout(10)
conn, _ = srv.accept(); conn.settimeout(2)
data = b""
try:
    while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        chunk = conn.recv(65536)
        if not chunk: break
        data += chunk
except socket.timeout:
    pass
open(out, "wb").write(data)
conn.close(); p.kill()
PY
}

cp tests/data/hello-rustls-mlkem.bin "$seeds/client_hello/rustls-mlkem.bin"
capture openssl openssl s_client -connect 127.0.0.1:PORT -servername pass.test -alpn h2,http/1.1
capture curl curl -sk --max-time 3 --resolve pass.test:PORT:127.0.0.1 https://pass.test:PORT/

python3 - "$seeds" <<'PY'
import os, sys
seeds = sys.argv[1]
d = os.path.join(seeds, "client_hello")
for name in ["rustls-mlkem", "openssl", "curl"]:
    hello = open(os.path.join(d, name + ".bin"), "rb").read()
    body = hello[5:]
    for n in (2, 3, 7):
        size = -(-len(body) // n)
        out = b"".join(hello[:3] + len(body[i:i+size]).to_bytes(2, "big") + body[i:i+size]
                       for i in range(0, len(body), size))
        open(os.path.join(d, f"{name}-{n}-records.bin"), "wb").write(b"\x07" + out)
    open(os.path.join(d, f"{name}-truncated.bin"), "wb").write(b"\x01" + hello[: len(hello) // 2])
    # The target's first byte picks the segmentation; the capture follows.
    open(os.path.join(d, name + ".bin"), "wb").write(b"\x05" + hello)
h = os.path.join(seeds, "http_head")
open(os.path.join(h, "challenge"), "wb").write(b"GET /.well-known/acme-challenge/LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0 HTTP/1.1\r\nHost: a.test\r\nsni-router-forwarded: 0123456789abcdef\r\n\r\n")
open(os.path.join(h, "redirect"), "wb").write(b"GET /a/b?c=d HTTP/1.1\r\nHost: WWW.test:80\r\nUser-Agent: curl\r\nAccept: */*\r\n\r\n")
p = os.path.join(seeds, "proxy_header")
open(os.path.join(p, "v1"), "wb").write(b"PROXY TCP4 192.0.2.1 198.51.100.2 4000 443\r\n\x16\x03\x01")
open(os.path.join(p, "v1-tcp6"), "wb").write(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n")
v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([192,0,2,1,198,51,100,2]) + (4000).to_bytes(2,"big") + (443).to_bytes(2,"big")
open(os.path.join(p, "v2"), "wb").write(v2 + b"\x16\x03\x01")
# A node's splice: the same with its fleet digest in TLV 0xE0.
tlv = b"\xe0\x00\x08" + bytes.fromhex("0123456789abcdef")
v2d = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x17" + v2[16:] + tlv
open(os.path.join(p, "v2-fleet-digest-tlv"), "wb").write(v2d + b"\x16\x03\x01")
PY
cp config/sni-router.toml "$seeds/config/default.toml"
# Every access-control shape: defaults, per-site lists, v4, v6, bare
# addresses, and a site its lists close (a warning); pools with weights,
# a drain list and health checks, and one fully drained (a warning).
cat >"$seeds/config/access.toml" <<'TOML'
this_node = "a"
[defaults]
allow = ["203.0.113.0/24", "2001:db8::/32", "192.0.2.7"]
deny = ["203.0.113.66/32", "::1"]
[limits]
max_per_source = 64
new_per_source_per_second = 20
[[nodes]]
name = "a"
tls = "127.0.0.2:443"
http = "127.0.0.2:80"
[[sites]]
names = ["admin.example.org"]
held_by = ["a"]
upstream = "127.0.0.1:9100"
allow = ["10.0.0.0/8"]
deny = ["10.0.0.1", "10.0.0.0/8"]
[[sites]]
names = ["pass.example.org"]
passthrough = "127.0.0.1:9443"
deny = []
[[sites]]
names = ["pool.example.org"]
held_by = ["a"]
upstream = ["127.0.0.1:9000", { addr = "127.0.0.1:9001", weight = 3 }, { addr = "[::1]:9002" }]
health = "tcp"
drain = ["127.0.0.1:9000"]
[[sites]]
names = ["passpool.example.org"]
passthrough = [{ addr = "127.0.0.1:9443", weight = 0 }]
TOML
ls -l "$seeds"/*
