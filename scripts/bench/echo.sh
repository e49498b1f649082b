#!/usr/bin/env bash
# The RPC overhead where it shows: a handler with no I/O (hello.v1.Greeter/
# SayHello) served by Trellis' one path (`hello`: the default stack —
# spans, RED metrics, rate limit, queue-delay shedding, timeouts — plus
# REST beside it, validation, health) and by a bare tonic server, under the
# same load generator. Rounds alternate; the server is pinned to CPU 1, the
# load generator to CPU 0. Reports requests/s, latency, and the server's
# CPU time per request (from /proc: user + system).
#
#   scripts/bench/echo.sh            # defaults: 5 rounds x 10 s, 32 callers, 4 connections
#   ROUNDS=3 SECS=5 scripts/bench/echo.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-5}; SECS=${SECS:-10}; CONC=${CONC:-32}; CONNS=${CONNS:-4}
cargo build --release -q -p trellis-examples --bin hello --example hello_bare_tonic --example hello_load
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

run() { # label port command...
  local label=$1 port=$2; shift 2
  RUST_LOG=warn taskset -c 1 "$@" > "$work/server.out" 2>&1 &
  local pid=$!; pids+=("$pid")
  wait_port "$port"
  local before; before=$(ticks "$pid")
  local line; line=$(taskset -c 0 "$bin/examples/hello_load" "127.0.0.1:$port" "$CONC" "$CONNS" "$SECS")
  local after; after=$(ticks "$pid")
  local requests; requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
  local cpu_us; cpu_us=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
  echo "$label $line cpu_us_per_req=$cpu_us"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

echo "SayHello (no I/O), ${CONC} callers over ${CONNS} connections, ${SECS}s per run, ${ROUNDS} rounds"
for _ in $(seq "$ROUNDS"); do
  run bare-tonic 19200 "$bin/examples/hello_bare_tonic" 127.0.0.1:19200
  run trellis 19201 "$bin/hello" 127.0.0.1:19201
done | tee "$work/results"
awk '{ for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="rps") { s[$1]+=kv[2]; n[$1]++ } if (kv[1]=="cpu_us_per_req") { c[$1]+=kv[2] } } }
     END { b=s["bare-tonic"]/n["bare-tonic"]; t=s["trellis"]/n["trellis"];
           printf "mean rps: bare tonic %.0f, trellis %.0f; ratio %.3f\n", b, t, t/b;
           printf "server CPU per request: bare tonic %.2f us, trellis %.2f us\n", c["bare-tonic"]/n["bare-tonic"], c["trellis"]/n["trellis"] }' "$work/results"
