#!/usr/bin/env bash
# The test suite from nothing but Python: creates .venv, installs everything, runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh dev,demo
exec .venv/bin/pytest "$@"
