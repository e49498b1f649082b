#!/usr/bin/env bash
# gRPC and h2c through the Trellis gateway vs the same calls made directly,
# in one run: `trellis serve user` as the upstream (GetUser over gRPC, and
# `GET /v1/users/{id}` over HTTP/2 without TLS), h2load as the client
# (nghttp2-client: prior-knowledge h2c, several streams per connection).
# The gateway is pinned to CPU 1; the service and h2load share CPU 0, so
# "direct" and "through the gateway" load the service's core alike. Prints
# requests/s, mean latency and the gateway's CPU time per request.
#
#   scripts/bench/gateway-grpc.sh     # ROUNDS=3 SECS=10 CONNS=4 STREAMS=8
#
# Needs h2load: apt-get install nghttp2-client
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; CONNS=${CONNS:-4}; STREAMS=${STREAMS:-8}
command -v h2load >/dev/null || { echo "h2load is missing: apt-get install nghttp2-client" >&2; exit 1; }
cargo build --release -q -p trellis-cli --bin trellis
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.2; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
USER=19502; GATEWAY=19503; ADMIN=19504

RUST_LOG=warn taskset -c 0 target/release/trellis serve user --listen "127.0.0.1:$USER" --data-dir "$work" > "$work/user.out" 2>&1 & pids+=($!)
cat > "$work/gateway.toml" <<EOF
[upstreams.user]
targets = [{ url = "http://127.0.0.1:$USER" }]
h2c = true
[routes.grpc]
prefix = "/shop.user.v1.UserService"
upstream = "user"
[routes.rest]
prefix = "/v1/users"
upstream = "user"
EOF
RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 1 target/release/trellis gateway --config "$work/gateway.toml" \
  --listen "127.0.0.1:$GATEWAY" --admin-listen "127.0.0.1:$ADMIN" > "$work/gateway.out" 2>&1 & pids+=($!); gateway_pid=$!
wait_port $USER; wait_port $GATEWAY
id=$(curl -s -XPOST "127.0.0.1:$USER/v1/users" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","displayName":"Bench"}' | sed -E 's/.*"id":"([^"]+)".*/\1/')
python3 -c 'import sys, struct
i = sys.argv[1].encode(); m = b"\x0a" + bytes([len(i)]) + i
sys.stdout.buffer.write(b"\x00" + struct.pack(">I", len(m)) + m)' "$id" > "$work/get_user.bin"
for port in $USER $GATEWAY; do
  status=$(curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary @"$work/get_user.bin" -D - -o /dev/null "http://127.0.0.1:$port/shop.user.v1.UserService/GetUser" \
    | tr -d '\r' | grep -i '^grpc-status:' || true)
  [ "$status" = "grpc-status: 0" ] || { echo "GetUser on port $port answered '$status'" >&2; exit 1; }
done
ticks() { awk '{ print $14 + $15 }' "/proc/$gateway_pid/stat"; }
tick=$(getconf CLK_TCK)
run() { # label port [h2load options] url-path
  local label=$1 port=$2; shift 2
  local path=${*: -1}; local opts=("${@:1:$#-1}")
  local before; before=$(ticks)
  local out; out=$(taskset -c 0 h2load -D "$SECS" -c "$CONNS" -m "$STREAMS" -t 1 "${opts[@]}" "http://127.0.0.1:$port$path" 2>&1)
  local after; after=$(ticks)
  local ok; ok=$(echo "$out" | awk '/^requests:/ { print $8 }')
  local bad; bad=$(echo "$out" | awk '/^status codes:/ { print $5 + $7 + $9 }')
  local mean; mean=$(echo "$out" | awk '/^time for request:/ { print $6 }')
  local cpu=0
  [ "$port" = "$GATEWAY" ] && cpu=$(( (after - before) * 1000000000 / tick / (ok > 0 ? ok : 1) ))
  echo "$label rps=$((ok / SECS)) mean=$mean errors=$bad gateway_cpu_ns_per_req=$cpu"
}
grpc=(-d "$work/get_user.bin" -H 'content-type: application/grpc' -H 'te: trailers')
echo "GetUser, h2load 1 thread x $CONNS connections x $STREAMS streams, ${SECS}s per run, $ROUNDS rounds"
for _ in $(seq "$ROUNDS"); do
  run grpc-direct $USER "${grpc[@]}" /shop.user.v1.UserService/GetUser
  run grpc-gateway $GATEWAY "${grpc[@]}" /shop.user.v1.UserService/GetUser
  run h2c-direct $USER "/v1/users/$id"
  run h2c-gateway $GATEWAY "/v1/users/$id"
done | tee "$work/results"
awk '{ for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="rps") { s[$1]+=kv[2]; n[$1]++ } if (kv[1]=="gateway_cpu_ns_per_req") { c[$1]+=kv[2] } } }
     END { for (k in s) { r[k]=s[k]/n[k]; u[k]=c[k]/n[k] }
           printf "gRPC unary: direct %.0f, through the gateway %.0f requests/s (%.2fx); gateway CPU %.1f us per call\n", r["grpc-direct"], r["grpc-gateway"], r["grpc-gateway"]/r["grpc-direct"], u["grpc-gateway"]/1000;
           printf "REST over h2c: direct %.0f, through the gateway %.0f requests/s (%.2fx); gateway CPU %.1f us per request\n", r["h2c-direct"], r["h2c-gateway"], r["h2c-gateway"]/r["h2c-direct"], u["h2c-gateway"]/1000 }' "$work/results"
