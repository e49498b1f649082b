#!/usr/bin/env bash
# The Trellis gateway, nginx and HAProxy in front of the same upstream, each
# proxy pinned to CPU 1, the upstream (nginx answering 200 "hello") and the
# load generator (wrk, HTTP/1.1 keep-alive) on CPU 0. Rounds alternate. For
# each proxy: requests/s, p50/p99 latency, and the proxy's CPU time per
# request (user + sys of all its processes over the run / requests served),
# the figure that separates proxies even when the load generator's core caps
# requests/s. Also the upstream called directly, for reference, and a second
# Trellis gateway with a route that verifies a bearer token (Ed25519 JWT
# against a key set), rate-limits per token subject, and records metrics
# and a server span (always on): the cost of the features against the plain
# route. The token is made with openssl (Ed25519), no other tool.
#
#   scripts/bench/gateway.sh       # ROUNDS=3 SECS=10 CONNS=64
#
# Needs nginx, haproxy and wrk: apt-get install nginx-light haproxy wrk
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; CONNS=${CONNS:-64}
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install nginx-light haproxy wrk" >&2; exit 1; }
done
cargo build --release -q -p trellis-cli --bin trellis
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.2; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
UP=19300; TRELLIS=19301; NGINX=19302; HAPROXY=19303; ADMIN=19304; FULL=19305; FULL_ADMIN=19306

mkdir -p "$work/up" "$work/nginx"
cat > "$work/up/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $work/up/nginx.pid; error_log $work/up/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { return 200 "hello"; } } }
EOF
cat > "$work/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $work/nginx/nginx.pid; error_log $work/nginx/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NGINX;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:$HAPROXY
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:$UP
EOF
cat > "$work/gateway.toml" <<EOF
[upstreams.up]
targets = [{ url = "http://127.0.0.1:$UP" }]
[routes.all]
prefix = "/"
upstream = "up"
EOF

# A key, its key set, and a token for wrk.
b64url() { basenc --base64url -w0 | tr -d '='; }
openssl genpkey -algorithm ed25519 -out "$work/jwt.pem" 2>/dev/null
x=$(openssl pkey -in "$work/jwt.pem" -pubout -outform DER | tail -c 32 | b64url)
printf '{"keys":[{"kty":"OKP","crv":"Ed25519","x":"%s","kid":"bench","alg":"EdDSA","use":"sig"}]}' "$x" > "$work/jwks.json"
header=$(printf '{"alg":"EdDSA","typ":"JWT","kid":"bench"}' | b64url)
claims=$(printf '{"iss":"bench","aud":"bench","sub":"wrk","exp":%d}' $(( $(date +%s) + 3600 )) | b64url)
printf '%s.%s' "$header" "$claims" > "$work/jwt.msg"
signature=$(openssl pkeyutl -sign -inkey "$work/jwt.pem" -rawin -in "$work/jwt.msg" | b64url)
token="$header.$claims.$signature"
cat > "$work/gateway-full.toml" <<EOF
[jwt]
jwks_file = "$work/jwks.json"
issuer = "bench"
audience = ["bench"]
claims_to_headers = { sub = "x-user-id" }
[upstreams.up]
targets = [{ url = "http://127.0.0.1:$UP" }]
[routes.all]
prefix = "/"
upstream = "up"
jwt = {}
rate_limit = { rate = 100000000, burst = 100000000, by = "subject" }
EOF

taskset -c 0 nginx -p "$work/up" -c "$work/up/nginx.conf" & pids+=($!)
taskset -c 1 nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" & pids+=($!); nginx_pid=$!
taskset -c 1 haproxy -f "$work/haproxy.cfg" -db & pids+=($!); haproxy_pid=$!
RUST_LOG=warn TOKIO_WORKER_THREADS=${WORKERS:-1} taskset -c 1 target/release/trellis gateway --config "$work/gateway.toml" \
  --listen "127.0.0.1:$TRELLIS" --admin-listen "127.0.0.1:$ADMIN" > "$work/trellis.out" 2>&1 & pids+=($!); trellis_pid=$!
RUST_LOG=warn TOKIO_WORKER_THREADS=${WORKERS:-1} taskset -c 1 target/release/trellis gateway --config "$work/gateway-full.toml" \
  --listen "127.0.0.1:$FULL" --admin-listen "127.0.0.1:$FULL_ADMIN" > "$work/trellis-full.out" 2>&1 & pids+=($!); full_pid=$!
for p in $UP $NGINX $HAPROXY $TRELLIS $FULL; do wait_port "$p"; done
code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $token" "http://127.0.0.1:$FULL/")
[ "$code" = 200 ] || { echo "the token route answered $code" >&2; cat "$work/trellis-full.out" >&2; exit 1; }

# CPU ticks (user + sys) of a proxy: its process and its children (nginx's
# worker), all pinned to CPU 1.
ticks() { # pid
  local total=0
  [ -n "$1" ] || { echo 0; return; }
  for pid in "$1" $(pgrep -P "$1"); do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
  done
  echo "$total"
}
tick=$(getconf CLK_TCK)
run() { # label port pid [wrk options]
  local before; before=$(ticks "$3")
  local out; out=$(taskset -c 0 wrk -t 1 -c "$CONNS" -d "${SECS}s" --latency "${@:4}" "http://127.0.0.1:$2/" 2>&1)
  local after; after=$(ticks "$3")
  local reqs; reqs=$(echo "$out" | awk '/requests in/ { print $1 }')
  local rps; rps=$(echo "$out" | awk '/^Requests\/sec/ { printf "%d", $2 }')
  local p50; p50=$(echo "$out" | awk '$1 == "50%" { print $2 }')
  local p99; p99=$(echo "$out" | awk '$1 == "99%" { print $2 }')
  local errs; errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ { print }' | tr '\n' ' ')
  local cpu=0
  [ -n "$3" ] && cpu=$(( (after - before) * 1000000000 / tick / (reqs > 0 ? reqs : 1) ))
  echo "$1 rps=$rps p50=$p50 p99=$p99 cpu_ns_per_req=$cpu requests=$reqs ${errs}"
}

echo "GET / through each proxy, wrk 1 thread x $CONNS connections, ${SECS}s per run, $ROUNDS rounds"
for _ in $(seq "$ROUNDS"); do
  run trellis $TRELLIS "$trellis_pid"
  run nginx $NGINX "$nginx_pid"
  run haproxy $HAPROXY "$haproxy_pid"
  run trellis_jwt $FULL "$full_pid" -H "authorization: Bearer $token"
done | tee "$work/results"
run direct $UP "" | tee -a "$work/results"
awk '{ for (i=2;i<=NF;i++) { split($i,kv,"="); if (kv[1]=="rps") { s[$1]+=kv[2]; n[$1]++ } if (kv[1]=="cpu_ns_per_req") { c[$1]+=kv[2] } } }
     END { for (k in s) { r[k]=s[k]/n[k]; u[k]=c[k]/n[k] }
           printf "mean rps: trellis %.0f, nginx %.0f, haproxy %.0f (upstream direct %.0f)\n", r["trellis"], r["nginx"], r["haproxy"], r["direct"];
           printf "proxy CPU per request (us): trellis %.1f, nginx %.1f, haproxy %.1f\n", u["trellis"]/1000, u["nginx"]/1000, u["haproxy"]/1000;
           printf "trellis vs nginx: %.2fx requests/s, %.2fx CPU per request; vs haproxy: %.2fx, %.2fx\n", r["trellis"]/r["nginx"], u["trellis"]/u["nginx"], r["trellis"]/r["haproxy"], u["trellis"]/u["haproxy"];
           printf "with JWT + rate limit per subject: %.0f requests/s, %.1f us CPU per request: %.2fx the plain route (requests/s)\n", r["trellis_jwt"], u["trellis_jwt"]/1000, r["trellis_jwt"]/r["trellis"] }' "$work/results"
