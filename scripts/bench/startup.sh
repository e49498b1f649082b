#!/usr/bin/env bash
# Startup to ready (first 200 from /readyz) and idle RSS, for
# `trellis serve user` and `trellis up`, each from an empty data dir.
#
#   scripts/bench/startup.sh          # 5 runs each
#   RUNS=10 scripts/bench/startup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-5}
cargo build --release -q -p trellis-cli --bin trellis
bin=target/release/trellis

measure() { # name port args...
  local name=$1 port=$2; shift 2
  local times=() rss=()
  for _ in $(seq "$RUNS"); do
    local dir; dir=$(mktemp -d)
    local t0; t0=$(date +%s%N)
    RUST_LOG=warn "$bin" "$@" --data-dir "$dir" > /dev/null 2>&1 &
    local pid=$!
    until curl -sf "http://127.0.0.1:$port/readyz" > /dev/null; do sleep 0.002; done
    local t1; t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000000 )))
    sleep 1
    rss+=($(awk '/VmRSS/{print $2}' "/proc/$pid/status"))
    kill -TERM "$pid"; wait "$pid" || true
    rm -rf "$dir"
  done
  local med_t med_r
  med_t=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
  med_r=$(printf '%s\n' "${rss[@]}" | sort -n | awk '{a[NR]=$1} END{printf "%.1f", a[int((NR+1)/2)]/1024}')
  echo "$name: startup to ready median ${med_t} ms (runs: ${times[*]}), idle RSS median ${med_r} MB"
}

measure "trellis serve user" 19182 serve user --listen 127.0.0.1:19182
measure "trellis up" 19282 up --base-port 19280
