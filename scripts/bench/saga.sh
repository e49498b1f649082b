#!/usr/bin/env bash
# Two-branch sagas per second through the coordinator — reserve stock
# (inventory), charge an account (payment), both behind the barrier — with
# the coordinator and both participants on SQLite, then on PostgreSQL
# (one database each, on one server started here); p50/p99 of submit to
# done (read from the coordinator's log) and of the submit's answer.
# The shop (`trellis up`) on CPU 1, the callers on CPU 0; PostgreSQL where
# the scheduler puts it.
#
#   scripts/bench/saga.sh          # defaults: N=20000 sagas, C=256 callers
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-20000}; C=${C:-256}
cargo build --release -q -p trellis-cli --bin trellis --example saga_load
for engine in sqlite postgres; do
  SAGA_CPUS=1 taskset -c 0 target/release/examples/saga_load "$engine" "$N" "$C"
done
