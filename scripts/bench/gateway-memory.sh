#!/usr/bin/env bash
# The gateway's resident memory idle, and with 10 000 open keep-alive
# connections that have each made one request (docs/benchmarks.md).
#
#   scripts/bench/gateway-memory.sh      # CONNS=10000; needs nginx (the upstream)
set -euo pipefail
cd "$(dirname "$0")/../.."
CONNS=${CONNS:-10000}
ulimit -n $((CONNS * 2 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p trellis-cli --bin trellis
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
mkdir -p "$work/up"
cat > "$work/up/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $work/up/nginx.pid; error_log $work/up/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:19400; location / { return 200 "hello"; } } }
NGINX
nginx -p "$work/up" -c "$work/up/nginx.conf" & pids+=($!)
cat > "$work/gateway.toml" <<TOML
[upstreams.up]
targets = [{ url = "http://127.0.0.1:19400" }]
[routes.all]
prefix = "/"
upstream = "up"
TOML
RUST_LOG=warn target/release/trellis gateway --config "$work/gateway.toml" --listen 127.0.0.1:19401 --admin-listen 127.0.0.1:19402 > "$work/out" 2>&1 & pids+=($!); gw=$!
wait_port 19400; wait_port 19401
rss() { awk '/VmRSS/ { print $2 }' "/proc/$gw/status"; }
curl -s -o /dev/null http://127.0.0.1:19401/
echo "idle (after one request): $(rss) KiB"
cat > "$work/clients.py" <<'PY'
import asyncio, os, sys
N = int(sys.argv[1])
async def one(i, conns):
    r, w = await asyncio.open_connection("127.0.0.1", 19401)
    w.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"); await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    await r.readexactly(5)
    assert head.startswith(b"HTTP/1.1 200"), head
    conns.append((r, w))
async def main():
    conns = []
    sem = asyncio.Semaphore(500)
    async def guarded(i):
        async with sem:
            await one(i, conns)
    await asyncio.gather(*(guarded(i) for i in range(N)))
    print(len(conns), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
PY
python3 "$work/clients.py" "$CONNS" > "$work/clients.out" & pids+=($!)
for _ in $(seq 600); do [ -s "$work/clients.out" ] && break; sleep 0.1; done
echo "with $(cat "$work/clients.out") open keep-alive connections: $(rss) KiB"
