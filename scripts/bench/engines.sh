#!/usr/bin/env bash
# Locks, idempotency and the cache (docs/benchmarks.md#locks-idempotency-and-the-cache):
# 1. lock acquire + release per backend (in process, Redis, Redlock over
#    three Redis, etcd) and the idempotency layer's cost per request
#    (memory and Redis stores) against the handler alone;
# 2. a read at each level of the cache;
# 3. GetUser over REST through `trellis serve user` with its cache (local
#    level) and without it, the same user, wrk on CPU 0, the service on CPU 1.
#
#   scripts/bench/engines.sh                 # D=10s C=32 for wrk
#   PARTS=getuser scripts/bench/engines.sh   # one part (locks cache getuser)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${D:-10s}; C=${C:-32}; PARTS=${PARTS:-locks cache getuser}
has() { [[ " $PARTS " == *" $1 "* ]]; }
if has locks; then
  cargo build --release -q -p trellis-lock --all-features --example lock_bench
  taskset -c 0 target/release/examples/lock_bench; echo
fi
if has cache; then
  cargo build --release -q -p trellis-cache --features redis --example cache_bench
  taskset -c 0 target/release/examples/cache_bench; echo
fi
has getuser || exit 0
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p trellis-cli --bin trellis
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=18402
echo "| GetUser over REST, $C connections | requests/s | p50 | p99 |"
echo "|---|---|---|---|"
for cache in true false; do
  rm -rf "$work/data"; mkdir -p "$work/data"
  printf '[cache]\nenabled = %s\n[log]\nlevel = "warn"\n' "$cache" > "$work/user.toml"
  RUST_LOG=warn taskset -c 1 target/release/trellis serve user --listen 127.0.0.1:$port \
    --admin-listen 127.0.0.1:0 --data-dir "$work/data" --config "$work/user.toml" >"$work/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:$port/readyz >/dev/null && break; sleep 0.1; done
  id=$(curl -sf -X POST http://127.0.0.1:$port/v1/users -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","displayName":"Bench"}' | sed -E 's/.*"id":"([^"]+)".*/\1/')
  out=$(taskset -c 0 wrk -t1 -c"$C" -d"$D" --latency "http://127.0.0.1:$port/v1/users/$id")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  label=$([ "$cache" = true ] && echo "with the cache (local hits)" || echo "without (SQLite every read)")
  echo "| $label | $rps | $p50 | $p99 |"
  kill -TERM $pid; wait $pid || true
done
