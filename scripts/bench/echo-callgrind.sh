#!/usr/bin/env bash
# Instructions (and allocations) per request, counted by callgrind: the
# same echo call (hello.v1.Greeter/SayHello) on bare tonic and on Trellis'
# one path. Unlike requests/s on a shared VM, the count does not move with
# neighbours, so small changes to the request path show. Needs valgrind
# (`apt-get install valgrind`); runs under it are ~50x slower, so the
# counters are zeroed after a warm-up and dumped after SECS of load.
#
#   scripts/bench/echo-callgrind.sh          # SECS=10
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${SECS:-10}
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 1; }
cargo build --release -q -p trellis-examples --bin hello --example hello_bare_tonic --example hello_load
bin=target/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wait_port() { for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

count() { # label port command...
  local label=$1 port=$2; shift 2
  mkdir -p "$work/$label"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/$label/out.%p" "$@" > "$work/$label.log" 2>&1 &
  local pid=$!
  wait_port "$port"
  "$bin/examples/hello_load" "127.0.0.1:$port" 8 2 3 > /dev/null
  callgrind_control -z "$pid" > /dev/null 2>&1
  local line; line=$("$bin/examples/hello_load" "127.0.0.1:$port" 8 2 "$SECS")
  callgrind_control -d "$pid" > /dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local requests; requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
  local dump; dump=$(ls "$work/$label"/out.*.1)
  local ir; ir=$(grep -E '^(summary|totals):' "$dump" | head -1 | awk '{print $2}')
  echo "$label requests=$requests instructions_per_request=$((ir / requests))"
}

echo "SayHello under callgrind, 8 callers over 2 connections, ${SECS}s"
count bare-tonic 19600 "$bin/examples/hello_bare_tonic" 127.0.0.1:19600
count trellis 19601 "$bin/hello" 127.0.0.1:19601
