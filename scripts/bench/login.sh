#!/usr/bin/env bash
# Login on the auth service (`trellis serve auth`, the user service beside
# it): requests/s and latency with the right password, a wrong one, and an
# unknown account — dominated by Argon2id at OWASP's cost (19 MiB, t = 2,
# p = 1), and the same for all three (a decoy hash for unknown accounts).
# The services on CPU 1, the load generator on CPU 0.
#
#   scripts/bench/login.sh        # defaults: 10 s per run, 2 callers (the hashes one
#                                 # pinned CPU runs at once; more callers queue, and past
#                                 # the queue-delay target the server sheds them, 503)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${SECS:-10}; CONC=${CONC:-2}
cargo build --release -q -p trellis-cli --bin trellis
cargo build --release -q -p shop-auth --example login_load
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

RUST_LOG=warn taskset -c 1 "$bin/trellis" serve user --listen 127.0.0.1:19202 --data-dir "$work" > "$work/user.out" 2>&1 &
pids+=("$!")
wait_port 19202
# Limits out of the way: this measures the hashing, not the refusals.
TRELLIS_USERS__ENDPOINT=http://127.0.0.1:19202 \
TRELLIS_LOGIN__MAX_FAILURES_PER_ACCOUNT=100000000 TRELLIS_LOGIN__MAX_FAILURES_PER_IP=100000000 \
RUST_LOG=warn taskset -c 1 "$bin/trellis" serve auth --listen 127.0.0.1:19201 --data-dir "$work" > "$work/auth.out" 2>&1 &
pids+=("$!")
wait_port 19201
echo "Login, ${CONC} callers, ${SECS}s per run"
for mode in ok wrong unknown; do
  echo "$mode $(taskset -c 0 "$bin/examples/login_load" 127.0.0.1:19201 "$mode" "$CONC" "$SECS")"
done
