#!/usr/bin/env bash
# What security costs a service: GetUser over gRPC against `trellis serve
# user` in plaintext, with `server.auth` verifying a bearer token on every
# call (an Ed25519 JWT made with openssl), with mutual TLS (`server.tls`
# with certificates from `trellis certs init`), and with both; then the
# handshake: a new connection for every call, plaintext vs mutual TLS. The
# same load generator in the same run, rounds alternating; the server on
# CPU 1, the load generator on CPU 0.
#
#   scripts/bench/secure.sh        # defaults: 3 rounds x 10 s, 32 callers, 4 connections
#   ROUNDS=5 SECS=20 scripts/bench/secure.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-10}; CONC=${CONC:-32}; CONNS=${CONNS:-4}
cargo build --release -q -p trellis-cli --bin trellis
cargo build --release -q -p shop-user --example grpc_load
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# Certificates, and a key, its key set and a token.
"$bin/trellis" certs init --dir "$work/certs" > /dev/null
b64url() { basenc --base64url -w0 | tr -d '='; }
openssl genpkey -algorithm ed25519 -out "$work/jwt.pem" 2>/dev/null
x=$(openssl pkey -in "$work/jwt.pem" -pubout -outform DER | tail -c 32 | b64url)
printf '{"keys":[{"kty":"OKP","crv":"Ed25519","x":"%s","kid":"bench","alg":"EdDSA","use":"sig"}]}' "$x" > "$work/jwks.json"
header=$(printf '{"alg":"EdDSA","typ":"JWT","kid":"bench"}' | b64url)
claims=$(printf '{"iss":"bench","aud":"bench","sub":"load","exp":%d}' $(( $(date +%s) + 3600 )) | b64url)
printf '%s.%s' "$header" "$claims" > "$work/jwt.msg"
signature=$(openssl pkeyutl -sign -inkey "$work/jwt.pem" -rawin -in "$work/jwt.msg" | b64url)
token="$header.$claims.$signature"

auth="[server.auth.tokens]
jwks_file = \"$work/jwks.json\"
issuer = \"bench\"
audience = [\"bench\"]"
tls="[server.tls]
cert_file = \"$work/certs/user.pem\"
key_file = \"$work/certs/user-key.pem\"
client_ca_file = \"$work/certs/ca.pem\""
mkdir -p "$work/plain" "$work/auth" "$work/mtls" "$work/both"
: > "$work/plain/user.toml"
printf '%s\n' "$auth" > "$work/auth/user.toml"
printf '%s\n' "$tls" > "$work/mtls/user.toml"
printf '%s\n\n%s\n' "$auth" "$tls" > "$work/both/user.toml"

# One user to fetch, in the database every run shares.
RUST_LOG=warn "$bin/trellis" serve user --listen 127.0.0.1:19102 --data-dir "$work" > "$work/seed.out" 2>&1 &
seed=$!; pids+=("$seed")
wait_port 19102
id=$(curl -s --json '{"email":"bench@example.com","displayName":"Bench"}' http://127.0.0.1:19102/v1/users | sed 's/.*"id":"\([^"]*\)".*/\1/')
kill -TERM "$seed"; wait "$seed" 2>/dev/null || true

run() { # label config-dir concurrency connections [env...]
  local label=$1 dir=$2 conc=$3 conns=$4; shift 4
  RUST_LOG=warn taskset -c 1 "$bin/trellis" serve user --listen 127.0.0.1:19103 --data-dir "$work" --config "$work/$dir/user.toml" > "$work/trellis.out" 2>&1 &
  local pid=$!; pids+=("$pid")
  wait_port 19103
  echo "$label $(env "$@" taskset -c 0 "$bin/examples/grpc_load" 127.0.0.1:19103 "$id" "$conc" "$conns" "$SECS")"
  if ! kill -TERM "$pid" 2>/dev/null; then echo "trellis exited early:" >&2; cat "$work/trellis.out" >&2; fi
  wait "$pid" 2>/dev/null || true
}

echo "GetUser, ${CONC} callers over ${CONNS} connections (handshake runs: 4 callers, a connection per call), ${SECS}s per run, ${ROUNDS} rounds"
for _ in $(seq "$ROUNDS"); do
  run plain plain "$CONC" "$CONNS"
  run auth auth "$CONC" "$CONNS" BEARER="$token"
  run mtls mtls "$CONC" "$CONNS" TLS_DIR="$work/certs" TLS_NAME=gateway
  run mtls+auth both "$CONC" "$CONNS" BEARER="$token" TLS_DIR="$work/certs" TLS_NAME=gateway
  run connect-plain plain 4 0
  run connect-mtls mtls 4 0 TLS_DIR="$work/certs" TLS_NAME=gateway
done
