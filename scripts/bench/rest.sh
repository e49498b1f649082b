#!/usr/bin/env bash
# GetUser over REST (`GET /v1/users/{id}`, transcoded) vs the same call over
# gRPC, on one `trellis serve user` in the same run: the REST face over h2c
# (the same connections and multiplexing as gRPC, so the difference is the
# transcoding) and over HTTP/1.1 keep-alive (how most REST clients call).
# Rounds alternate; the server is pinned to CPU 1, the load generators to CPU 0.
#
#   scripts/bench/rest.sh            # defaults: 3 rounds x 10 s, 32 callers, 4 connections
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; CONC=${CONC:-32}; CONNS=${CONNS:-4}
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
  local out; out=$(pin 0 "$@")
  local after; after=$(cpu)
  local reqs; reqs=$(echo "$out" | sed -E 's/requests=([0-9]+).*/\1/')
  echo "$label $out server_cpu_us_per_req=$(( (after - before) * 1000000 / tick / (reqs > 0 ? reqs : 1) ))"
}
wait_port 19102
id=$(curl -s -XPOST 127.0.0.1:19102/v1/users -H 'content-type: application/json' -d '{"email":"bench@example.com","displayName":"Bench"}' | sed -E 's/.*"id":"([^"]+)".*/\1/')

echo "GetUser, ${CONC} callers, ${SECS}s per run, ${ROUNDS} rounds (user $id)"
for _ in $(seq "$ROUNDS"); do
  measure grpc "$bin/examples/grpc_load" 127.0.0.1:19102 "$id" "$CONC" "$CONNS" "$SECS"
  measure rest-h2c "$bin/examples/rest_load" 127.0.0.1:19102 "$id" "$CONC" "$CONNS" "$SECS" h2c
  measure rest-h1 "$bin/examples/rest_load" 127.0.0.1:19102 "$id" "$CONC" 1 "$SECS" h1
done | tee "$work/results"
awk '{ for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="rps") { s[$1]+=kv[2]; n[$1]++ } if (kv[1]=="server_cpu_us_per_req") { c[$1]+=kv[2] } } }
     END { g=s["grpc"]/n["grpc"]; h=s["rest-h2c"]/n["rest-h2c"]; o=s["rest-h1"]/n["rest-h1"];
           printf "mean rps: gRPC %.0f, REST over h2c %.0f, REST over HTTP/1.1 %.0f\n", g, h, o;
           printf "server CPU per request (us): gRPC %.0f, REST over h2c %.0f, REST over HTTP/1.1 %.0f\n", c["grpc"]/n["grpc"], c["rest-h2c"]/n["rest-h2c"], c["rest-h1"]/n["rest-h1"];
           printf "ratios: REST h2c / gRPC %.3f, REST HTTP/1.1 / gRPC %.3f\n", h/g, o/g }' "$work/results"
