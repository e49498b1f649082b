#!/usr/bin/env bash
# GetUser over REST (`GET /v1/users/{id}`, transcoded) vs the same call over
# gRPC, on one `trellis serve user` in the same run. The headline pair uses
# one load generator for both faces, h2load (nghttp2-client), over the same
# h2c connections and streams, so the difference is the server's. The
# Rust clients follow: tonic for gRPC, hyper for REST over h2c and over
# HTTP/1.1 keep-alive (how most REST clients call). Rounds alternate; the
# server is pinned to CPU 1, the load generators to CPU 0.
#
#   scripts/bench/rest.sh            # defaults: 3 rounds x 10 s, 32 callers, 4 connections
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; CONC=${CONC:-32}; CONNS=${CONNS:-4}
command -v h2load >/dev/null || { echo "h2load is missing: apt-get install nghttp2-client" >&2; exit 1; }
cargo build --release -q -p trellis-cli --bin trellis
cargo build --release -q -p shop-user --example grpc_load --example rest_load
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
pin() { if command -v taskset >/dev/null; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

RUST_LOG=warn taskset -c 1 "$bin/trellis" serve user --listen 127.0.0.1:19102 --data-dir "$work" > "$work/trellis.out" 2>&1 &
server=$!
pids+=("$server")
# The server's CPU time (user + system), in clock ticks.
cpu() { awk '{ print $14 + $15 }' "/proc/$server/stat"; }
tick=$(getconf CLK_TCK)
# Runs a load generator; appends the server's CPU microseconds per request.
measure() {
  local label=$1; shift
  local before; before=$(cpu)
  local out
  if declare -F "$1" >/dev/null; then out=$("$@"); else out=$(pin 0 "$@"); fi
  local after; after=$(cpu)
  local reqs; reqs=$(echo "$out" | sed -E 's/.*requests=([0-9]+).*/\1/')
  echo "$label $out server_cpu_us_per_req=$(( (after - before) * 1000000 / tick / (reqs > 0 ? reqs : 1) ))"
}
wait_port 19102
id=$(curl -s -XPOST 127.0.0.1:19102/v1/users -H 'content-type: application/json' -d '{"email":"bench@example.com","displayName":"Bench"}' | sed -E 's/.*"id":"([^"]+)".*/\1/')

# The gRPC request for h2load: one framed GetUserRequest { id }.
python3 -c 'import sys, struct
i = sys.argv[1].encode(); m = b"\x0a" + bytes([len(i)]) + i
sys.stdout.buffer.write(b"\x00" + struct.pack(">I", len(m)) + m)' "$id" > "$work/get_user.bin"
# h2load counts HTTP statuses; a gRPC error is a 200 too, so check one call.
status=$(curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
  --data-binary @"$work/get_user.bin" -D - -o /dev/null "http://127.0.0.1:19102/shop.user.v1.UserService/GetUser" | tr -d '\r' | grep -i '^grpc-status:' || true)
[ "$status" = "grpc-status: 0" ] || { echo "GetUser over gRPC answered '$status'" >&2; exit 1; }
# Runs h2load; prints its result as the Rust load generators do.
h2l() {
  local out; out=$(pin 0 h2load -D "$SECS" -c "$CONNS" -m $((CONC / CONNS)) -t 1 "$@" 2>&1)
  local ok; ok=$(echo "$out" | awk '/^requests:/ { print $8 }')
  # Streams still open when the time is up count as failed, not as errors.
  local failed; failed=$(echo "$out" | awk '/^requests:/ { print $12 + $14 }')
  local non2xx; non2xx=$(echo "$out" | awk '/^status codes:/ { print $5 + $7 + $9 }')
  echo "requests=$ok errors=$((failed + non2xx)) rps=$((ok / SECS))"
}

echo "GetUser, ${CONC} callers, ${SECS}s per run, ${ROUNDS} rounds (user $id)"
for _ in $(seq "$ROUNDS"); do
  measure grpc-h2load h2l -d "$work/get_user.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:19102/shop.user.v1.UserService/GetUser"
  measure rest-h2c-h2load h2l "http://127.0.0.1:19102/v1/users/$id"
  measure grpc "$bin/examples/grpc_load" 127.0.0.1:19102 "$id" "$CONC" "$CONNS" "$SECS"
  measure rest-h2c "$bin/examples/rest_load" 127.0.0.1:19102 "$id" "$CONC" "$CONNS" "$SECS" h2c
  measure rest-h1 "$bin/examples/rest_load" 127.0.0.1:19102 "$id" "$CONC" 1 "$SECS" h1
done | tee "$work/results"
awk '{ for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="rps") { s[$1]+=kv[2]; n[$1]++ } if (kv[1]=="server_cpu_us_per_req") { c[$1]+=kv[2] } } }
     END { for (k in s) { r[k]=s[k]/n[k]; u[k]=c[k]/n[k] }
           printf "mean rps: h2load: gRPC %.0f, REST over h2c %.0f; Rust clients: gRPC %.0f, REST over h2c %.0f, REST over HTTP/1.1 %.0f\n", r["grpc-h2load"], r["rest-h2c-h2load"], r["grpc"], r["rest-h2c"], r["rest-h1"];
           printf "server CPU per request (us): h2load: gRPC %.0f, REST over h2c %.0f; Rust clients: gRPC %.0f, REST over h2c %.0f, REST over HTTP/1.1 %.0f\n", u["grpc-h2load"], u["rest-h2c-h2load"], u["grpc"], u["rest-h2c"], u["rest-h1"];
           printf "ratios: one load generator (h2load), REST h2c / gRPC %.3f; Rust clients, REST h2c / gRPC %.3f, REST HTTP/1.1 / gRPC %.3f\n", r["rest-h2c-h2load"]/r["grpc-h2load"], r["rest-h2c"]/r["grpc"], r["rest-h1"]/r["grpc"] }' "$work/results"
