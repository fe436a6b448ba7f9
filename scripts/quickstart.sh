#!/usr/bin/env bash
# Quick start: initialise $AEX_HOME (default ~/.aex), start the control plane and Envoy, create a
# demo agent and send one governed request through the gateway. Without OPENAI_API_KEY or
# GROQ_API_KEY the providers are served by the built-in mock, so this works offline.
set -euo pipefail

aex init
aex daemon start

if ! aex agent inspect demo >/dev/null 2>&1; then
  aex agent create demo 1.00 60
fi
home="${AEX_HOME:-$HOME/.aex}"
token=$(cat "$home/credentials/demo")
# The gateway's port: [ports] envoy in config.toml (9000 unless changed).
port=$(awk -F'[ =]+' '/^\[/ { in_ports = ($0 ~ /^\[ports\]/); next } in_ports && $1 == "envoy" { print $2 }' "$home/config.toml")
url="http://127.0.0.1:${port:-9000}/v1"
# A model of a provider that has a key (environment or the home's .env), so that the demo proves
# the real provider works; with none, the mock serves them all.
has_key() { [ -n "${!1:-}" ] || grep -qs "^[[:space:]]*\(export[[:space:]]\+\)\?$1=..*" "$home/.env"; }
model=gpt-4o-mini
if ! has_key OPENAI_API_KEY && has_key GROQ_API_KEY; then
  model=gpt-oss-20b
fi

echo
echo "==> POST $url/chat/completions as agent 'demo' (model $model)"
if ! curl -sS --fail-with-body "$url/chat/completions" \
  -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello through AEX\"}]}"; then
  echo
  echo "The demo request failed (see the error above; logs in $home/logs)." >&2
  exit 1
fi
echo
sleep 0.5
echo
aex agent inspect demo
echo
echo "The stack keeps running. Point any OpenAI SDK at it:"
echo "  export OPENAI_BASE_URL=$url OPENAI_API_KEY=$token"
echo "Stop it with: aex daemon stop   (or make stop)"
