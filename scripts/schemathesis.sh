#!/usr/bin/env bash
# Checks docs/openapi.yaml against what a real node does: starts `calmkv serve`
# with --auth-token on a loopback port and a temporary data directory, runs
# schemathesis (PyPI: `pip install schemathesis`) against it, and stops it.
#
#   scripts/schemathesis.sh [--max-examples N] [other `st run` options]
#
# Exits with schemathesis' status: 0 when it found no failure.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v st >/dev/null || { echo "schemathesis is not installed: pip install schemathesis" >&2; exit 2; }

cargo build --release --bin calmkv
data=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
export CALMKV_AUTH_TOKEN="schemathesis-$RANDOM$RANDOM"
target/release/calmkv serve --data-dir "$data/node" --http-addr "127.0.0.1:$port" \
  --auth-token "$CALMKV_AUTH_TOKEN" >"$data/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done
curl -fs "http://127.0.0.1:$port/healthz" >/dev/null || { cat "$data/serve.log" >&2; exit 1; }

SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH=scripts \
  st --config-file scripts/schemathesis.toml run docs/openapi.yaml \
  --url "http://127.0.0.1:$port" --max-examples 100 "$@"
