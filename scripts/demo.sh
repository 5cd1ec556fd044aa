#!/usr/bin/env bash
# The demo from nothing but Python: creates .venv, installs npm-hf with the demo extra, runs `npm-hf demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh demo
exec .venv/bin/npm-hf demo "$@"
