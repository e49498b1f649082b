#!/usr/bin/env bash
# GetUser over gRPC: the Trellis server (`trellis serve user`, with its
# default stack: traces without an exporter, RED metrics, rate limit, queue
# shedding) against the same handler on a bare tonic server; against
# Trellis with both load shedders switched on by config; and against
# Trellis exporting traces over OTLP to a local sink with sampling at 0 %
# and at 100 %, with the same load generator in the same run. Rounds alternate over one SQLite database;
# the server is pinned to CPU 1, the load generator to CPU 0.
#
#   scripts/bench/rpc.sh            # defaults: 3 rounds x 10 s, 32 callers, 4 connections
#   ROUNDS=5 SECS=20 CONC=64 CONNS=8 scripts/bench/rpc.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; CONC=${CONC:-32}; CONNS=${CONNS:-4}
cargo build --release -q -p trellis-cli --bin trellis
cargo build --release -q -p shop-user --example bare_tonic --example grpc_load
cargo build --release -q -p trellis-testkit --features otlp --example otlp_sink
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
pin() { if command -v taskset >/dev/null; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

run_bare() {
  pin 1 "$bin/examples/bare_tonic" 127.0.0.1:19100 "sqlite://$work/user.db" > "$work/bare.out" 2>&1 &
  local pid=$!; pids+=("$pid")
  for _ in $(seq 200); do grep -q seeded "$work/bare.out" 2>/dev/null && break; sleep 0.05; done
  wait_port 19100
  id=$(awk '/seeded/{print $2}' "$work/bare.out")
  echo "bare-tonic $( pin 0 "$bin/examples/grpc_load" 127.0.0.1:19100 "$id" "$CONC" "$CONNS" "$SECS")"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

run_trellis() { # label [env assignments...]
  local label=$1; shift
  env "$@" RUST_LOG=warn taskset -c 1 "$bin/trellis" serve user --listen 127.0.0.1:19101 --data-dir "$work" > "$work/trellis.out" 2>&1 &
  local pid=$!; pids+=("$pid")
  wait_port 19101
  echo "$label $( pin 0 "$bin/examples/grpc_load" 127.0.0.1:19101 "$id" "$CONC" "$CONNS" "$SECS")"
  if ! kill -TERM "$pid" 2>/dev/null; then echo "trellis exited early:" >&2; cat "$work/trellis.out" >&2; fi
  wait "$pid" 2>/dev/null || true
}

# The OTLP sink shares CPU 0 with the load generator, as a collector on
# another host would not; what the server pays is the span work itself.
taskset -c 0 "$bin/examples/otlp_sink" > "$work/sink.out" 2> "$work/sink.err" &
pids+=("$!")
for _ in $(seq 100); do [ -s "$work/sink.out" ] && break; sleep 0.05; done
sink=$(head -1 "$work/sink.out")

echo "GetUser, ${CONC} callers over ${CONNS} connections, ${SECS}s per run, ${ROUNDS} rounds"
for _ in $(seq "$ROUNDS"); do
  run_bare
  run_trellis trellis-stack
  run_trellis trellis-shed TRELLIS_SERVER__SHEDDING__CONCURRENCY=adaptive TRELLIS_SERVER__SHEDDING__CPU_THRESHOLD=800
  run_trellis trellis-otlp-0 OTEL_EXPORTER_OTLP_ENDPOINT="$sink" OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0
  run_trellis trellis-otlp-100 OTEL_EXPORTER_OTLP_ENDPOINT="$sink" OTEL_TRACES_SAMPLER=parentbased_always_on
done | tee "$work/results"
echo "spans received by the sink: $(tail -1 "$work/sink.err")"
awk '{ for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="rps") { s[$1]+=kv[2]; n[$1]++ } } }
     END { b=s["bare-tonic"]/n["bare-tonic"]; t=s["trellis-stack"]/n["trellis-stack"]; u=s["trellis-shed"]/n["trellis-shed"];
           z=s["trellis-otlp-0"]/n["trellis-otlp-0"]; f=s["trellis-otlp-100"]/n["trellis-otlp-100"];
           printf "mean ok rps: bare-tonic %.0f, trellis (default stack) %.0f, shedding on %.0f, OTLP 0%% %.0f, OTLP 100%% %.0f\n", b, t, u, z, f;
           printf "ratios: default stack / bare tonic %.3f, shedding on / default %.3f, OTLP 0%% / default %.3f, OTLP 100%% / default %.3f\n", t/b, u/t, z/t, f/t }' "$work/results"
